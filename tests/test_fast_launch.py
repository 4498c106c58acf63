"""The launch shortcut (`litespark_kernels._launch`): its key and its argument order, on the CPU.

The GPU side (the shortcut's launches equal Triton's, bit for bit, and a training step takes it) is
tests/gpu/test_fast_launch_gpu.py; the host time it saves is benchmarks/bench_launch.py.
"""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from litespark_kernels import _launch  # noqa: E402

tl = triton.language


def _kernel(x_ptr, y_ptr, n, stride, eps, flag, BLOCK: tl.constexpr, HAS_Y: tl.constexpr = False):
    pass


def _params():
    return JITFunction(_kernel).params


def _specialization(args):
    """Triton's own specialisation of each non-constexpr argument (what picks the compiled kernel)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in args)


def _random_args(rng: random.Random):
    base = torch.randn(64, dtype=rng.choice([torch.float32, torch.bfloat16]))
    x = base[rng.choice([0, 0, 1, 4, 8]):]  # offsets of 4 and 8 elements move the pointer's 16-byte alignment
    ints = [1, 2, 15, 16, 17, 32, 1000, 1024, -16, -3, 2**31 - 1, 2**31, 2**32, 2**40 + 16, 2**63, 0]
    return (x, rng.choice([x, None]), rng.choice(ints), rng.choice(ints), rng.choice([1e-6, 0.5]),
            rng.choice([True, False]))


def test_equal_keys_mean_equal_triton_specialisation():
    """The key is at least as fine as Triton's specialisation: two calls with one key get one compiled kernel."""
    launcher = _launch.FastLauncher(JITFunction(_kernel))
    rng = random.Random(0)
    seen: dict = {}
    distinct = set()
    for _ in range(600):
        args = _random_args(rng)
        key, _ = launcher.key(args + (64,), {"HAS_Y": args[1] is not None})
        spec = _specialization(args)
        distinct.add(spec)
        assert seen.setdefault(key, spec) == spec, (key, spec, seen[key])
    assert len(distinct) > 20  # the random calls did cover many specialisations


def test_key_replaces_tensors_by_their_pointers_and_keeps_constexprs():
    launcher = _launch.FastLauncher(JITFunction(_kernel))
    x = torch.randn(8)
    key, values = launcher.key((x, None, 7, 16, 1e-5, True, 128), {"HAS_Y": False, "num_warps": 4})
    assert values == [x.data_ptr(), None, 7, 16, 1e-5, True, 128]
    assert 128 in key and (("HAS_Y", False), ("num_warps", 4)) in key
    other, _ = launcher.key((x, None, 7, 16, 1e-5, True, 256), {"HAS_Y": False, "num_warps": 4})
    assert other != key  # a constexpr's value is part of the key
    with pytest.raises(_launch._Uncached):
        launcher.key((x, None, 7, 16, 1e-5, True, 128, 0, 0), {})
    with pytest.raises(_launch._Uncached):
        launcher.key(([1, 2], None, 7, 16, 1e-5, True, 128), {})


class _FakeKernel:
    """Stands in for Triton's CompiledKernel: ``run`` records what the launcher would receive."""

    def __init__(self):
        self.calls = []
        self.function = object()
        self.packed_metadata = (4, 1, 0)

    def run(self, *args):
        self.calls.append(args)


class _FakeJIT:
    """A JITFunction's parameters with a ``[grid]`` that records the plain launches."""

    def __init__(self):
        self.params = _params()
        self.plain = []
        self.kernels = []

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.plain.append((grid, args, kwargs))
            self.kernels.append(_FakeKernel())
            return self.kernels[-1]

        return go


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(_launch, "_CHECKED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_raw_stream", lambda device: 1234)
    monkeypatch.delenv("LITESPARK_FAST_LAUNCH", raising=False)
    jit = _FakeJIT()
    return jit, _launch.FastLauncher(jit)


def test_second_launch_with_the_same_key_goes_straight_to_the_compiled_kernel(fake):
    jit, launcher = fake
    x, y = torch.randn(32), torch.randn(32)
    launcher[(3,)](x, y, 32, 1, 1e-6, True, BLOCK=64, num_warps=4)
    assert len(jit.plain) == 1 and launcher.stats == {"fast": 0, "triton": 1}
    x2 = torch.randn(32)
    launcher[(5, 2)](x2, y, 48, 1, 1e-5, True, BLOCK=64, num_warps=4)
    assert len(jit.plain) == 1 and launcher.stats["fast"] == 1
    (call,) = jit.kernels[0].calls
    # grid, stream, function, metadata, no launch metadata or hooks, then every parameter in order: pointers for
    # tensors, the keyword constexpr, and HAS_Y's default
    assert call[:3] == (5, 2, 1) and call[3] == 1234 and call[4] is jit.kernels[0].function
    assert call[5] == (4, 1, 0) and call[6:9] == (None, None, None)
    assert call[9:] == (x2.data_ptr(), y.data_ptr(), 48, 1, 1e-5, True, 64, False)


def test_a_new_specialisation_goes_through_triton_again(fake):
    jit, launcher = fake
    x = torch.randn(64)
    launcher[(1,)](x, x, 32, 1, 1e-6, True, BLOCK=64)
    launcher[(1,)](x[1:], x, 32, 1, 1e-6, True, BLOCK=64)  # pointer no longer 16-byte aligned
    launcher[(1,)](x, x, 1, 1, 1e-6, True, BLOCK=64)  # n == 1 is a constant for Triton
    launcher[(1,)](x, x, 32, 1, 1e-6, True, BLOCK=128)  # another constexpr
    launcher[(1,)](x.bfloat16(), x, 32, 1, 1e-6, True, BLOCK=64)  # another dtype
    assert len(jit.plain) == 5 and launcher.stats["fast"] == 0
    launcher[(1,)](x, x, 48, 1, 1e-5, True, BLOCK=64)  # the first call's specialisation
    assert len(jit.plain) == 5 and launcher.stats["fast"] == 1


def test_calls_the_key_cannot_describe_take_the_plain_launch(fake, monkeypatch):
    jit, launcher = fake
    x = torch.randn(32)
    launcher[(1,)](x, x, 32, 1, 1e-6, True, BLOCK=64)
    launcher[(1,)](x, x, 32, 1, 1e-6, True, BLOCK=64)
    assert launcher.stats["fast"] == 1
    launcher[(1,)](x, x, 32, 1, 1e-6, flag=True, BLOCK=64)  # a runtime argument by keyword
    launcher[lambda meta: (1,)](x, x, 32, 1, 1e-6, True, BLOCK=64)  # a callable grid
    monkeypatch.setenv("LITESPARK_FAST_LAUNCH", "0")
    launcher[(1,)](x, x, 32, 1, 1e-6, True, BLOCK=64)
    monkeypatch.delenv("LITESPARK_FAST_LAUNCH")
    triton.knobs.runtime.launch_enter_hook.add(_noop_hook)
    try:
        launcher[(1,)](x, x, 32, 1, 1e-6, True, BLOCK=64)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(_noop_hook)
    assert len(jit.plain) == 5 and launcher.stats["fast"] == 1
    assert launcher.stats["a non-constexpr argument passed by keyword"] == 1
    assert launcher.stats["grid not a tuple"] == 1
    assert launcher.stats["disabled"] == 1 and launcher.stats["launch hooks set"] == 1
    launcher[(1,)](x, x, 32, 1, 1e-6, True, BLOCK=64)
    assert launcher.stats["fast"] == 2


def _noop_hook(metadata):
    pass


def test_interpreted_kernels_are_left_as_they_are():
    """Under TRITON_INTERPRET=1 (the CPU tests) the kernels are not JITFunctions and are not wrapped."""
    from litespark_kernels.ops import _rms_norm_triton

    assert not isinstance(_rms_norm_triton._rms_fwd_kernel, _launch.FastLauncher)
    assert _launch.fast_launch(_rms_norm_triton._rms_fwd_kernel) is _rms_norm_triton._rms_fwd_kernel
    assert isinstance(_launch.fast_launch(JITFunction(_kernel)), _launch.FastLauncher)
