"""Test setup: eight simulated CPU devices, and the `gpu` and `triton_interpreter` markers.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""

import os
import shutil

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Without an NVIDIA GPU (no nvidia-smi), every test program, and the processes tests start, are compiled with the
# backend's machine-code optimisation off (as `tests/fast_compile.FAST` does per program): code generation
# dominates the suite's time on CPU, and the HLO passes (fusion, sharding, buffer assignment) are unchanged. The
# whole suite took 11:16 instead of 16:27 on two cores. On a GPU host the tests compile as users' programs do.
if shutil.which("nvidia-smi") is None and "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", os.environ.get("JAXDEEP_TEST_PLATFORMS", ""))
if not os.environ["JAX_PLATFORMS"]:
    del os.environ["JAX_PLATFORMS"]

import atexit  # noqa: E402
import importlib.util  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests compile the same small programs (a tiny model's train step, say) again: a compilation cache on disk,
# fresh for each test process, serves the repeats. Values are unchanged (the same executable is loaded).
_CACHE_DIR = tempfile.mkdtemp(prefix="jaxdeep_test_jax_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    # `triton_interpreter` tests run the Triton kernels in Triton's interpreter, except those also marked `gpu`,
    # which compile them and need only triton itself.
    interpreted = [item for item in items if item.get_closest_marker("triton_interpreter")]
    if interpreted:  # importing triton costs start-up time: only when such a test runs
        from kernels.triton_runtime import interpreter_unavailable_reason

        no_interpreter = interpreter_unavailable_reason()
        no_triton = importlib.util.find_spec("triton") is None
        for item in interpreted:
            if not item.get_closest_marker("gpu") and no_interpreter:
                item.add_marker(pytest.mark.skip(reason=f"Triton's interpreter cannot run here: {no_interpreter}"))
            elif no_triton:
                item.add_marker(pytest.mark.skip(reason="triton is not installed"))
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to jax)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
