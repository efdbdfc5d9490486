"""Test setup: Keras (the parity oracle) runs on its JAX backend; everything runs on CPU."""
import os
import sys

import pytest

# configs/ is imported as a package, as main.py's config files do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Compiled executables are reused across tests and runs (the suite compiles the same steps often).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "blockft_jax", "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session", autouse=True)
def remove_keras_reference_files():
    """keras_oracle's saved models go when this process's tests are done."""
    yield
    oracle = sys.modules.get("keras_oracle")
    if oracle is not None:
        oracle.remove_saved_files()
