"""Test-wide JAX settings: as strict as the libraries allow, and 8 virtual CPU devices for sharding tests.

XLA_FLAGS must be set before jax is imported anywhere, which is why this happens at the top of conftest.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at test time
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# JAX's persistent compilation cache, kept with the test environment (~/.cache/flaxvision) so that a warm run
# recompiles only what changed; set through the environment so the CLI and trainer children share it.
# FLAXVISION_TEST_JAX_CACHE=off turns it off (e.g. to measure compilation).
_cache = os.environ.get("FLAXVISION_TEST_JAX_CACHE", os.path.expanduser("~/.cache/flaxvision/test-jax-cache"))
if _cache != "off":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # No size cap: with one, jax (0.10) fails every cache write once a killed process has left an entry without its
    # access-time file (jax-ml/jax#39880), and the tests kill trainers on purpose.

import jax  # noqa: E402
import pytest  # noqa: E402

# Implicit rank promotion ((B, N, D) + (D,)) hides shape bugs: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
# dtype promotion stays "standard": "strict" is beyond what flax allows (nnx.avg_pool divides by an int32).


@pytest.fixture(scope="session")
def cpu_devices():
    devices = jax.devices("cpu")
    assert len(devices) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    return devices
