"""Running a Triton kernel module two ways, shared by every kernel family under `kernels/`.

- `run_triton`: `jax_triton.triton_call` (GPU; traceable under jit). With `poison`, the kernel's `*_poisoned`
  twin runs on outputs pre-filled with NaN (0x7FFF.. for integers) and aliased to them, so unwritten elements show.
- `run_interpret`: Triton's interpreter on the host through `jax.pure_callback` (CPU; slow, for tests). Same kernel
  source, argument order and launch parameters; outputs always start NaN-filled.

`inputs` mixes arrays and Python ints (scalar kernel arguments), in the kernel's argument order; the outputs
follow them. Both return a list of arrays shaped like `out_shapes`. `unavailable_reason()` says why "triton" cannot
run here (no CUDA GPU, or triton / jax-triton missing), for the dispatchers' "auto".
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import pathlib
import re
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or jax-triton refusing a jaxlib without GPU support
        return f"triton/jax-triton cannot be imported ({type(e).__name__}: {e})"
    return None


@functools.cache
def _is_rocm() -> bool:
    try:
        version = jax.devices()[0].client.platform_version.lower()
    except Exception:  # no such attribute on this jax: assume CUDA
        return False
    return "rocm" in version or "hip" in version


@functools.cache
def interpreter_unavailable_reason() -> str | None:
    """Why Triton's interpreter (runner "interpret") cannot run the kernels here, or None when it can."""
    try:
        import triton
    except Exception as e:
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    try:
        with warnings.catch_warnings():  # numpy 2.0-2.3 only warn
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.zeros(1, np.int32))
    except TypeError:
        # Older interpreters index loops by program ids held as one-element arrays, through int(); 3.9's squeezes.
        if version < (3, 9):
            return (
                f"the interpreter of triton {triton.__version__} takes int() of one-element arrays, which numpy "
                f"{np.__version__} refuses (triton 3.9's interpreter runs here)"
            )
    return None


def cuda_unavailable_reason() -> str | None:
    """Why this process has no CUDA GPU to run Triton kernels on, or None when it has one."""
    if jax.default_backend() != "gpu":
        return f"no GPU: the JAX backend is {jax.default_backend()!r}"
    if _is_rocm():
        return "the kernels use NVIDIA PTX; this GPU runs ROCm"
    return None


def unavailable_reason() -> str | None:
    """Why the Triton kernels (runner "triton") cannot run here, or None when they can."""
    return cuda_unavailable_reason() or _triton_import_error()


def fill_value(dtype) -> Any:
    dtype = np.dtype(dtype)
    floating = np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16" or dtype.name.startswith("float8")
    return np.nan if floating else np.iinfo(dtype).max


def run_triton(module: ModuleType, name: str, inputs, out_shapes: Sequence, grid, num_warps, num_stages, meta, poison):
    import jax_triton

    common = dict(out_shape=list(out_shapes), grid=grid, num_warps=num_warps, num_stages=num_stages)
    if not poison:
        return list(jax_triton.triton_call(*inputs, kernel=getattr(module, name), **common, **meta))
    fills = [jnp.full(s.shape, fill_value(s.dtype), s.dtype) for s in out_shapes]
    n_arrays = sum(not isinstance(a, int) for a in inputs)
    aliases = {n_arrays + i: i for i in range(len(out_shapes))}
    out = jax_triton.triton_call(
        *inputs,
        *fills,
        kernel=getattr(module, name + "_poisoned"),
        input_output_aliases=aliases,
        **common,
        **meta,
    )
    return list(out)


class HostTensor:
    """The little of torch.Tensor's interface that Triton's interpreter uses, over a numpy array."""

    def __init__(self, array: np.ndarray):
        assert array.flags.c_contiguous
        self.array = array
        self.dtype = f"torch.{array.dtype.name}"

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def copy_(self, other) -> None:
        pass  # the interpreter works on this very memory

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args, **kwargs):
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)


@contextlib.contextmanager
def interpret_env():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@functools.cache
def interpreted_copy(path: str, module_name: str) -> ModuleType:
    """A second copy of the kernel file at `path` whose @triton.jit functions run in the interpreter.

    Library @triton.jit helpers (tl.sum, tl.zeros, tl.cdiv, ...) were fixed as compiled when triton was first
    imported, so kernel files meant for this copy must not call them (see kernels/norms/triton_kernels.py)."""
    spec = importlib.util.spec_from_file_location(module_name, pathlib.Path(path))
    module = importlib.util.module_from_spec(spec)
    with interpret_env():
        spec.loader.exec_module(module)
    return module


# XLA may run independent host callbacks of one program at the same time; Triton's interpreter keeps global state
# (and `interpret_env` sets a process-wide variable), so interpreted launches take turns.
_INTERPRETER_LOCK = threading.Lock()


def run_interpret(module: ModuleType, name: str, inputs, out_shapes: Sequence, grid, meta):
    kernel = getattr(module, name)
    array_inputs = [a for a in inputs if not isinstance(a, int)]

    def host(*arrays):
        it = iter(arrays)
        args = [a if isinstance(a, int) else HostTensor(np.ascontiguousarray(next(it))) for a in inputs]
        outs = [np.full(s.shape, fill_value(s.dtype), s.dtype) for s in out_shapes]
        with _INTERPRETER_LOCK, interpret_env():
            kernel[grid](*args, *[HostTensor(o) for o in outs], **meta)
        return tuple(outs)

    shapes = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shapes)
    return list(jax.pure_callback(host, shapes, *array_inputs, vmap_method="sequential"))


def run(package: str, runner: str, name: str, inputs, out_shapes: Sequence, grid, num_warps, num_stages, meta, poison):
    """Kernel `name` of `<package>.triton_kernels` with `runner` "triton" (GPU) or "interpret" (CPU; outputs always
    start NaN-filled, warps and stages mean nothing there). Returns a list of arrays shaped like `out_shapes`."""
    if runner == "interpret":
        reason = interpreter_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the kernels cannot run in Triton's interpreter here: {reason}")
        origin = importlib.util.find_spec(f"{package}.triton_kernels").origin
        module = interpreted_copy(origin, f"{package}._triton_kernels_interpreted")
        outs = run_interpret(module, name, inputs, out_shapes, grid, meta)
    elif runner == "triton":
        module = importlib.import_module(f"{package}.triton_kernels")
        outs = run_triton(module, name, inputs, out_shapes, grid, num_warps, num_stages, meta, poison)
    else:
        raise ValueError(f"runner must be 'triton' or 'interpret', got {runner!r}")
    arrays = [a for a in inputs if not isinstance(a, int)]
    return varying_like(outs, *arrays)


def varying_axes(a: jax.Array) -> frozenset:
    """The manual mesh axes over which `a` differs between devices (empty outside shard_map)."""
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def varying_like(arrays: Sequence[jax.Array], *others: jax.Array) -> list[jax.Array]:
    """`arrays`, each marked as varying over every manual mesh axis that it or any of `others` varies over.

    Inside `shard_map` a kernel call's outputs carry no varying-axes type of their own (a host callback, or
    jax-triton's primitive), though they vary as their inputs do. And a `custom_vjp` must return each cotangent
    with its input's type: weights shared over the data axes get a gradient that differs per device (each
    device's own tokens), so such operands are cast to varying before the custom_vjp, which puts the cast's
    transpose, the sum over those axes, outside it, as plain autodiff would. Outside shard_map: unchanged.
    """
    axes = frozenset().union(*(varying_axes(a) for a in (*arrays, *others)))
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - varying_axes(a)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out
