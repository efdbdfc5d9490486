"""Test setup: Keras (the parity oracle) runs on its JAX backend; everything runs on CPU."""
import os
import sys

# configs/ is imported as a package, as main.py's config files do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Compiled executables are reused across tests and runs (the suite compiles the same steps often).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "blockft_jax", "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The modules that take minutes are collected first: pytest-xdist (`--dist loadscope`) hands out
# whole modules in collection order, and a long one handed out last runs alone while the other
# worker waits. (Longest first, by `--durations`; a module missing here only runs later.)
LONG_MODULES = ("test_layout.py", "test_resume.py", "test_search.py", "test_train.py",
                "test_multiprocess.py", "test_halving.py", "test_models.py", "test_newcomer.py",
                "test_cli.py", "test_benchmark.py", "test_baselines.py", "test_cohort.py")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONG_MODULES)))
