"""One XLA CPU device per physical core, for the command line. A CPU is one JAX device unless
told otherwise, and one run's step rarely keeps every core busy (small convolutions,
depthwise ones most of all); with a device per core, a cohort's runs train side by side, one a
core, each device's program a one-run program (the demo on two cores: 1.13-1.23x faster,
docs/performance.md). The count must be in XLA_FLAGS before JAX starts, so `main` sets it
before it imports JAX; a count the user set is kept, and so is everything else in XLA_FLAGS.
It only adds host (CPU) devices: on a GPU or TPU machine JAX computes on those as before."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def physical_cores(cpuinfo: str | None = None, allowed: set[int] | None = None,
                   quota: float | None = None) -> int:
    """The physical cores this process may run on: the processors it is allowed
    (sched_getaffinity) counted once per (socket, core) -- hyperthreads share a core's
    arithmetic units, so a second device on one core would only compete for them -- and no more
    than a container's CPU quota (cgroup v2 cpu.max). The arguments stand in for the machine
    (tests); wherever /proc says nothing, the processors allowed."""
    allowed = _allowed_processors() if allowed is None else allowed
    cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    cores = set()
    for block in cpuinfo.split("\n\n"):
        fields = dict(_field(line) for line in block.splitlines() if ":" in line)
        if fields.get("processor", "").isdigit() and int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id"), fields.get("core id", fields["processor"])))
    count = len(cores) or len(allowed)
    quota = _cgroup_quota() if quota is None else quota
    if quota:
        count = min(count, max(1, int(-(-quota // 1))))  # a 1.5-CPU quota still runs 2 threads
    return max(count, 1)


def with_device_count(xla_flags: str, devices: int) -> str:
    """XLA_FLAGS with `devices` host devices, in place of any count they name (the other flags
    kept). Whether to override a user's count is the caller's decision: `use_every_core` does
    not."""
    others = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*others, f"{DEVICE_COUNT_FLAG}={devices}"])


def use_every_core(environ=os.environ) -> int | None:
    """Sets one CPU device per physical core in `environ`'s XLA_FLAGS, before JAX is
    imported; returns the count it set, or None where it left things alone (the user named a
    count, or JAX was already imported and would not read it)."""
    flags = environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags or "jax" in sys.modules:
        return None
    devices = physical_cores()
    environ["XLA_FLAGS"] = with_device_count(flags, devices)
    return devices


def _field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def _allowed_processors() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _cgroup_quota() -> float | None:
    """CPUs a cgroup v2 quota allows ("200000 100000": 2.0), or None (no quota, or none
    readable)."""
    match = re.fullmatch(r"(\d+) (\d+)", _read("/sys/fs/cgroup/cpu.max").strip())
    return int(match[1]) / int(match[2]) if match and int(match[2]) else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
