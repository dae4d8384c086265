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
