"""One CPU device per physical core for the command line (blockft_jax/common/cores.py): how
cores are counted, and that a count the user set is kept."""
import sys

from blockft_jax.common import cores


def cpuinfo(*processors) -> str:
    """/proc/cpuinfo's blocks for (processor, physical id, core id) triples."""
    return "\n\n".join(f"processor\t: {p}\nmodel name\t: Xeon\nphysical id\t: {s}\n"
                       f"core id\t\t: {c}" for p, s, c in processors) + "\n"


# Two sockets of two cores, each core two hyperthreads (Linux numbers the siblings last).
SMT = cpuinfo((0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1),
              (4, 0, 0), (5, 0, 1), (6, 1, 0), (7, 1, 1))


def test_cores_not_hyperthreads():
    assert cores.physical_cores(SMT, allowed=set(range(8)), quota=0) == 4
    # Same core ids on the other socket are other cores.
    assert cores.physical_cores(SMT, allowed={0, 2}, quota=0) == 2
    # A core's two threads are one core; only the processors allowed count.
    assert cores.physical_cores(SMT, allowed={0, 4}, quota=0) == 1
    assert cores.physical_cores(SMT, allowed={0, 1, 4, 5}, quota=0) == 2


def test_a_container_quota_caps_the_count():
    assert cores.physical_cores(SMT, allowed=set(range(8)), quota=2.0) == 2
    assert cores.physical_cores(SMT, allowed=set(range(8)), quota=1.5) == 2
    assert cores.physical_cores(SMT, allowed=set(range(8)), quota=0.5) == 1
    assert cores.physical_cores(SMT, allowed=set(range(8)), quota=16.0) == 4


def test_without_core_ids_each_processor_allowed_counts():
    bare = "\n\n".join(f"processor\t: {p}\nBogoMIPS\t: 50.00" for p in range(4))  # e.g. ARM
    assert cores.physical_cores(bare, allowed={0, 1, 2}, quota=0) == 3
    assert cores.physical_cores("", allowed={0, 1, 2, 3, 4}, quota=0) == 5  # no /proc
    assert cores.physical_cores("", allowed=set(), quota=0) == 1


def test_this_machine_has_at_least_one():
    assert 1 <= cores.physical_cores()


def test_the_users_count_and_other_flags_are_kept(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # as main sees it: JAX not yet imported
    monkeypatch.setattr(cores, "physical_cores", lambda: 6)
    environ = {}
    assert cores.use_every_core(environ) == 6
    assert environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=6"
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/hlo"}
    assert cores.use_every_core(environ) == 6
    assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/hlo --xla_force_host_platform_device_count=6"
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert cores.use_every_core(environ) is None
    assert environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


def test_a_count_given_replaces_the_one_named():
    """What the search benchmark's one-device arm asks for, whatever XLA_FLAGS said."""
    assert cores.with_device_count("", 1) == "--xla_force_host_platform_device_count=1"
    eight = "--xla_dump_to=/tmp/hlo --xla_force_host_platform_device_count=8"
    one = "--xla_dump_to=/tmp/hlo --xla_force_host_platform_device_count=1"
    assert cores.with_device_count(eight, 1) == one


def test_too_late_once_jax_is_imported(monkeypatch):
    import jax  # noqa: F401 -- JAX has read XLA_FLAGS: a count set now would be ignored
    environ = {}
    assert cores.use_every_core(environ) is None and environ == {}
