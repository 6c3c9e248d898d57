"""Test setup: eight simulated CPU devices, and the `gpu` marker.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", os.environ.get("JAXDEEP_TEST_PLATFORMS", ""))
if not os.environ["JAX_PLATFORMS"]:
    del os.environ["JAX_PLATFORMS"]

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to jax)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
