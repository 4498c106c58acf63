"""Launching a Triton kernel without Triton's per-call binding.

A Triton launch (``kernel[grid](*args)``) binds every argument on each call: one specialisation call per argument
(type, 16-byte alignment of pointers, ``== 1`` and ``% 16`` of integers), a string of the launch options for the
cache key, a launch-metadata object and two launch-hook calls, and a pointer query to the driver per tensor. Measured
on an H200 host (benchmarks/NOTES.md, session 16): 18.2 us per launch through Triton, 14.9 through this shortcut, of
an RMSNorm op's ~60-70 us of host time; a step of the post-training bench makes ~250 launches.

``fast_launch(kernel)`` wraps a ``@triton.jit`` kernel so that ``wrapped[grid](*args, **kwargs)`` does the same
launch with less work: it computes a key that is at least as fine as Triton's specialisation (for every positional
argument: a tensor's dtype, CUDA-ness and pointer alignment to 16 bytes; an int's ``== 1``, ``% 16 == 0`` and
32/64-bit range; a bool's value; a float's type; a constexpr's value; plus the keyword arguments (constexprs and
launch options, by value) and the current device). The first call with a new key goes through Triton as usual
(compiling if needed) and keeps the compiled kernel; later calls with that key pass the tensors' pointers straight
to the compiled kernel's launcher. A finer key than Triton's only costs an extra pass through Triton, never a wrong
kernel.

The plain Triton launch is used whenever the shortcut could differ from it:
- Triton's CPU interpreter (``TRITON_INTERPRET=1``), a Triton version this was not checked against (see
  ``CHECKED_TRITON``), or ``LITESPARK_FAST_LAUNCH=0``;
- launch hooks registered (``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``, e.g. a profiler);
- a call whose arguments the key does not describe (anything but tensors, ints, floats, bools, ``None`` and
  hashable constexprs; a callable grid; a non-constexpr argument passed by keyword).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction
except Exception:  # pragma: no cover - Triton is optional
    triton = None
    _knobs = None
    _JITFunction = None

# Triton versions whose launch internals (CompiledKernel.run's arguments, the C launcher taking integer pointers)
# this module was checked against on a GPU.
CHECKED_TRITON = ("3.6",)

_I32_MIN, _I32_MAX, _U64_FROM = -(2**31), 2**31 - 1, 2**63


def _version_checked() -> bool:
    if triton is None:
        return False
    return ".".join(triton.__version__.split(".")[:2]) in CHECKED_TRITON


_CHECKED = _version_checked()

try:  # what Triton's CUDA driver itself uses for the current stream (no Stream object per call)
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - CPU-only builds of torch

    def _raw_stream(device):
        return torch.cuda.current_stream(device).cuda_stream


def enabled() -> bool:
    """Whether launches may take the shortcut (``LITESPARK_FAST_LAUNCH`` is read per call: tests flip it).

    The interpreter needs no check here: under ``TRITON_INTERPRET=1`` ``triton.jit`` makes no JITFunction, so
    `fast_launch` returns the kernel unwrapped."""
    return _CHECKED and os.environ.get("LITESPARK_FAST_LAUNCH", "1") != "0"


def _hooks_set() -> bool:
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class _Uncached(Exception):
    """This call's arguments are not described by the key: launch through Triton."""


class FastLauncher:
    """``FastLauncher(jit_fn)[grid](*args, **kwargs)`` launches like ``jit_fn[grid](*args, **kwargs)``.

    ``stats`` counts launches per path (``fast``, ``triton`` and, per reason, the plain launches that the key could
    not describe), for tests and benchmarks.
    """

    def __init__(self, fn):
        self.fn = fn
        params = list(getattr(fn, "params", ()))
        self._names = tuple(p.name for p in params)
        self._constexpr = tuple(bool(p.is_constexpr) for p in params)
        self._defaults = tuple(p.default if p.has_default else _MISSING for p in params)
        self._cache: dict = {}
        self.stats: dict[str, int] = {"fast": 0, "triton": 0}
        self.name = getattr(getattr(fn, "fn", None), "__name__", None) or repr(fn)
        _ALL.append(self)

    def __getattr__(self, name):  # the wrapped kernel's attributes (fn, src, ...)
        return getattr(self.__dict__["fn"], name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _plain(self, grid, args, kwargs, reason: str | None = None):
        if reason is not None:
            self.stats[reason] = self.stats.get(reason, 0) + 1
        return self.fn[grid](*args, **kwargs)

    def key(self, args: tuple, kwargs: dict) -> tuple[tuple, list]:
        """(key, launch arguments): the arguments with every tensor replaced by its pointer. Raises `_Uncached`."""
        constexpr = self._constexpr
        if len(args) > len(constexpr):
            raise _Uncached("too many arguments")
        key = [len(args)]
        values = list(args)
        for i, a in enumerate(args):
            if constexpr[i]:
                key.append(a)
                continue
            t = type(a)
            if t is int:
                key.append(
                    (a == 1, a & 15 == 0, 0 if _I32_MIN <= a <= _I32_MAX else (2 if a >= _U64_FROM else 1))
                )
            elif isinstance(a, torch.Tensor):
                p = a.data_ptr()
                key.append((a.dtype, a.is_cuda, p & 15 == 0))
                values[i] = p
            elif t is float:
                key.append(float)
            elif t is bool or a is None:
                key.append(a)
            else:
                raise _Uncached(f"argument of type {t.__name__}")
        if kwargs:
            key.append(tuple(kwargs.items()))
        return tuple(key), values

    def _tail(self, n_args: int, kwargs: dict) -> tuple:
        """The parameters after the positional ones, in order: keyword constexprs, then defaults."""
        tail = []
        for name, is_c, default in zip(self._names[n_args:], self._constexpr[n_args:], self._defaults[n_args:]):
            if name in kwargs:
                if not is_c:
                    raise _Uncached("a non-constexpr argument passed by keyword")
                tail.append(kwargs[name])
            elif default is not _MISSING:
                tail.append(default)
            else:
                raise _Uncached(f"argument {name} missing")
        return tuple(tail)

    def launch(self, grid, args: tuple, kwargs: dict):
        if not enabled():
            return self._plain(grid, args, kwargs, "disabled")
        if type(grid) is not tuple:
            return self._plain(grid, args, kwargs, "grid not a tuple")
        if _hooks_set():
            return self._plain(grid, args, kwargs, "launch hooks set")
        try:
            key, values = self.key(args, kwargs)
            device = torch.cuda.current_device()
            entry = self._cache.get((device, key))
        except (_Uncached, TypeError) as e:  # TypeError: an unhashable constexpr or keyword value
            return self._plain(grid, args, kwargs, str(e) if isinstance(e, _Uncached) else "unhashable argument")
        if entry is None:
            try:
                tail = self._tail(len(args), kwargs)
            except _Uncached as e:
                return self._plain(grid, args, kwargs, str(e))
            kernel = self.fn[grid](*args, **kwargs)
            self.stats["triton"] += 1
            if hasattr(kernel, "result"):  # an asynchronous compile's future
                kernel = kernel.result()
            if kernel is not None:
                self._cache[(device, key)] = (kernel.run, kernel.function, kernel.packed_metadata, tail, kernel)
            return kernel
        run, function, metadata, tail, kernel = entry
        n = len(grid)
        self.stats["fast"] += 1
        run(
            grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
            _raw_stream(device), function, metadata, None, None, None, *values, *tail,
        )
        return kernel


_MISSING = object()
_ALL: list[FastLauncher] = []


def launchers() -> dict[str, FastLauncher]:
    """Every `FastLauncher` made in this process, by kernel name (tests and `benchmarks/bench_host_overhead.py`)."""
    return {launcher.name: launcher for launcher in _ALL}


def fast_launch(fn):
    """Wrap a ``@triton.jit`` kernel in a `FastLauncher`; anything else (the interpreter's functions) as it is."""
    if _JITFunction is None or not isinstance(fn, _JITFunction):
        return fn
    return FastLauncher(fn)
