"""Choosing between a Triton kernel and its PyTorch reference.

Every op in this package has a plain PyTorch reference (the specification, the CPU path and the test oracle) and,
where written, a Triton kernel. ``use_triton`` decides per call; whenever it refuses, it says why once per
(op, reason) through ``warnings.warn``.

Environment switches:
- ``LITESPARK_DISABLE_TRITON=1``: always use the references.
- ``LITESPARK_FORCE_TRITON=1``: run the Triton kernels even on CPU tensors (only meaningful with
  ``TRITON_INTERPRET=1``, Triton's CPU interpreter; used by the tests).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

try:  # Triton is a Linux-only dependency; everything works without it through the references.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

_WARNED: set[tuple[str, str]] = set()


def _warn(key: tuple[str, str], message: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"litespark: {message}", stacklevel=4)


def warn_once(op: str, reason: str) -> None:
    """Warn once per (op, reason) that the PyTorch reference runs instead of the Triton kernel."""
    _warn((op, reason), f"{op} uses the PyTorch reference: {reason}")


def note_once(key: str, message: str) -> None:
    """Warn once per (key, message), with the message as given (``litespark: <message>``)."""
    _warn((key, message), message)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def force_triton() -> bool:
    return os.environ.get("LITESPARK_FORCE_TRITON", "0") == "1"


def use_triton(op: str, *tensors: torch.Tensor | None) -> bool:
    """True when ``op`` should run its Triton kernel on these tensors; otherwise warns once and returns False.

    Runs on every op call (hundreds per training step), so it is written for host time: one pass over the tensors.
    """
    env = os.environ
    if env.get("LITESPARK_DISABLE_TRITON") == "1":
        warn_once(op, "disabled by LITESPARK_DISABLE_TRITON=1")
        return False
    if not HAS_TRITON:
        warn_once(op, "triton is not installed")
        return False
    on_cuda = True
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, _DTensor):
            # A parameter still sharded by FSDP2 (a DTensor) must not reach a raw pointer kernel; torch ops handle it.
            warn_once(op, "a DTensor input (a sharded FSDP2 parameter)")
            return False
        if on_cuda and not t.is_cuda:
            on_cuda = False
    if on_cuda or (force_triton() and interpreting()):
        return True
    if interpreting():
        warn_once(op, "inputs are not on a CUDA device (TRITON_INTERPRET=1 alone runs the references: set "
                      "LITESPARK_FORCE_TRITON=1 too to run the Triton kernels in Triton's CPU interpreter)")
    else:
        warn_once(op, "inputs are not on a CUDA device")
    return False


_PROBES: dict[tuple[str, str], bool] = {}


def device_supports(feature: str, device: torch.device, check) -> bool:
    """Whether ``check(device)`` runs and returns True on this device (a torch/cuBLAS feature probed on a tiny case);
    run once per (feature, device), an exception counts as unsupported."""
    key = (feature, str(device))
    ok = _PROBES.get(key)
    if ok is None:
        try:
            ok = bool(check(device))
        except Exception:  # older torch, or not for this device
            ok = False
        _PROBES[key] = ok
    return ok


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type`` (what ops run in), else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def run_triton(module: str, name: str, *args, **kwargs):
    """Call ``litespark_kernels.<module>.<name>`` (an autograd Function's entry point).

    Outside compilation the entry is called directly: its autograd Function, no custom-op dispatch and no
    ``torch.compiler.disable`` wrapper (each costs microseconds of host time per call, and a training step makes
    hundreds of these calls). Under ``torch.compile`` the call goes to the op's ``torch.library`` custom op
    (`litespark_kernels.ops._custom_ops`, imported on the first compiled call), which Dynamo traces without a graph
    break; an entry without one (the optimizer) is called eagerly, a graph break.
    """
    if torch.compiler.is_compiling():
        from .ops import _custom_ops

        compiled = _custom_ops.COMPILED.get((module, name))
        if compiled is not None:
            return compiled(*args, **kwargs)
        return _eager_call(module, name, *args, **kwargs)
    return _triton_entry(module, name)(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _triton_entry(module: str, name: str):
    """The Triton module is imported on first use only (after TRITON_INTERPRET is set, and never on CPU-only runs)."""
    import importlib

    return getattr(importlib.import_module(f"litespark_kernels.ops.{module}"), name)


@torch.compiler.disable
def _eager_call(module: str, name: str, *args, **kwargs):
    return _triton_entry(module, name)(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _sm_count_cached(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 4  # Triton's CPU interpreter: any small number


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (persistent-grid sizes); a small constant in the CPU interpreter."""
    return _sm_count_cached(device.type, device.index)


try:  # resolved once: use_triton runs on every op call
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover - torch without distributed
    _DTensor = ()


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, _DTensor)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> a 2D [M, N] view (copy only when unavoidable) whose last dimension is contiguous."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def unsupported(op: str, reason: str) -> bool:
    """Record that a kernel cannot take these inputs (warns once) and return False, for use in dispatchers."""
    warn_once(op, reason)
    return False
