"""Frozen rows/columns in the multi-tensor AdamW kernel on CUDA (issue #19), with bf16/fp16 shadows.

Bitwise criteria, as in tests/test_adamw_frozen.py: frozen elements of the weight, exp_avg, exp_avg_sq and shadow
equal their values before the step; kept elements equal the kernel's unmasked step from the same values; the shadow
of a kept element is exactly ``p.to(shadow dtype)``. Sizes: a [4096, 2048] weight frozen by rows (two full blocks
per row: wholly kept and wholly frozen blocks), a [1000, 4099] weight frozen by columns (every block mixed), a
1-D tensor with a masked tail, a 3-D tensor frozen along its middle dimension, an unmasked tensor among them, a
[512, 8192] weight frozen by columns (rows a multiple of the block: the kernel's contiguous-slice layout); also
at addresses that are not 16-byte aligned. The masked step does not make the host wait for the GPU. Then SAT on a
Litespark model with `LitesparkAdamW` and its bf16 cast shadow: the omitted weights, moments and shadow rows stay
bit-for-bit, the shadow stays consistent and equal to bf16(weights).
"""

import warnings

import pytest
import torch

from litespark_kernels.ops.optim import adamw_step

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]

CASES = [((4096, 2048), 0), ((1000, 4099), 1), ((3 * 8192 + 5,), 0), ((64, 48, 33), 1), ((2048,), None),
         ((123, 45), -1), ((512, 8192), 1)]
HP = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(shapes, seed, offset, s_dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(s, scale=1.0, positive=False, dtype=torch.float32):
        n = int(torch.tensor(s).prod())
        flat = (torch.rand if positive else torch.randn)(n + offset, generator=g, device="cuda") * scale
        t = flat[offset:].view(s)  # offset 1: a view 4 bytes past an aligned address (the unaligned variant)
        return t if dtype == torch.float32 else t.to(dtype)

    ps = [make(s) for s in shapes]
    ms = [make(s, 0.01) for s in shapes]
    vs = [make(s, 1e-4, True) for s in shapes]
    ss = [make(s, dtype=s_dtype) for s in shapes]
    ss[2] = None  # a tensor without a shadow
    return ps, ms, vs, ss


def _masks(seed):
    g = torch.Generator(device="cuda").manual_seed(100 + seed)
    out = []
    for i, (shape, dim) in enumerate(CASES):
        if dim is None:
            out.append(None)
            continue
        keep = torch.rand(shape[dim], generator=g, device="cuda") < 0.5
        keep[0], keep[-1] = True, False
        out.append((dim, keep.to(torch.uint8) if i == 1 else keep))
    return out


def _split(t, dim, keep):
    keep = keep.bool()
    t = t.movedim(dim, 0)
    return t[keep], t[~keep]


def _clone(xs):
    return [None if x is None else x.clone() for x in xs]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("s_dtype", [torch.bfloat16, torch.float16])
def test_masked_kernel_freezes_exactly_and_matches_unmasked(offset, s_dtype):
    shapes = [s for s, _ in CASES]
    ps, ms, vs, ss = _state(shapes, 0, offset, s_dtype)
    scale = torch.tensor(1.7, device="cuda")
    cache, plain_cache = {}, {}
    g = torch.Generator(device="cuda").manual_seed(1)
    for step in (1, 2, 3):
        gs = [torch.randn(s, generator=g, device="cuda") for s in shapes]
        frozen = _masks(step)
        before = [_clone(ps), _clone(ms), _clone(vs), _clone(ss)]
        ref = [_clone(x) for x in before]
        adamw_step(ref[0], gs, ref[1], ref[2], step=step, grad_scale=scale, shadows=ref[3], cache=plain_cache, **HP)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                adamw_step(ps, gs, ms, vs, step=step, grad_scale=scale, shadows=ss, frozen=frozen, cache=cache,
                           **HP)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if step > 1:  # after the first launch (compilation)
            assert not [w for w in caught if "synchroniz" in str(w.message)]
        for i, f in enumerate(frozen):
            for now, was, unmasked in zip((ps[i], ms[i], vs[i], ss[i]), (b[i] for b in before),
                                          (r[i] for r in ref)):
                if now is None:
                    continue
                if f is None:
                    assert torch.equal(now, unmasked), i
                    continue
                kept_now, frozen_now = _split(now, *f)
                assert torch.equal(frozen_now, _split(was, *f)[1]), (i, "frozen elements changed")
                assert torch.equal(kept_now, _split(unmasked, *f)[0]), (i, "kept elements differ from unmasked")
                assert not torch.equal(kept_now, _split(was, *f)[0])
            if ss[i] is not None:
                keep_p, _ = _split(ps[i], *f) if f is not None else (ps[i], None)
                keep_s, _ = _split(ss[i], *f) if f is not None else (ss[i], None)
                assert torch.equal(keep_s, keep_p.to(s_dtype)), "shadow is not the rounded weight"
    assert {"table", "frozen"} <= set(cache) and "frozen" not in plain_cache  # the kernel ran, with masks


def test_sat_litespark_adamw_keeps_omitted_weights_moments_and_shadow(monkeypatch):
    import litespark_hf
    from litespark_hf import LitesparkAdamW
    from litespark_hf.sat import enable_sat, frozen_omitted, sat_step
    from litespark_hf.sat import core as sat_core
    from tiny_models import random_batch, tiny_model

    model = tiny_model("llama", hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, num_hidden_layers=2).cuda()
    litespark_hf.apply(model)
    enable_sat(model, sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_schedule="constant",
               sat_exempt_layers="", sat_refresh_interval=0)
    model.train()
    opt = LitesparkAdamW(model.parameters(), lr=1e-3, model=model, shadow_dtype=torch.bfloat16)
    shadow = opt.shadow
    assert shadow is not None
    restores = []
    monkeypatch.setattr(sat_core.OmittedFreezer, "restore", lambda self: restores.append(self))
    for s in range(5):  # step 0 dense (refresh), then sparse
        sat_step(model, s, 10)
        ids = random_batch(2, 64, seed=s, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        slices = sat_core._omitted_slices(sat_core.controller(model))
        before = []
        for p, dim, om in slices:
            st = opt.state.get(p, {})
            tensors = [p.detach()] + [st[k] for k in ("exp_avg", "exp_avg_sq") if k in st]
            if p in shadow.param_views:
                tensors.append(shadow.param_views[p])
            before.append([(t, dim, om, t.index_select(dim, om)) for t in tensors])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with frozen_omitted(model, opt):
                    opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if s >= 2:
            assert not [w for w in caught if "synchroniz" in str(w.message)]
        opt.zero_grad()
        assert bool(slices) == (s > 0)
        for entries in before:
            for t, dim, om, was in entries:
                assert torch.equal(t.index_select(dim, om), was)
        assert shadow.consistent()  # nothing was copied back behind the optimizer's back
        for p in shadow.params:
            assert torch.equal(shadow.param_views[p], p.detach().to(torch.bfloat16))
    assert restores == []  # LitesparkAdamW took the masks: no save-and-restore
    assert any("frozen" in c for c in opt._caches.values())
