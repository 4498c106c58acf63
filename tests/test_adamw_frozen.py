"""Frozen rows/columns in the fused AdamW step (issue #19): ``adamw_step(..., frozen=...)`` (Triton kernel in the
CPU interpreter and the reference), ``LitesparkAdamW.set_frozen``, and SAT's ``sat_freeze_omitted`` through it.

The criterion is bitwise everywhere: frozen elements of the weight, exp_avg, exp_avg_sq and shadow equal their
values before the step; kept elements equal the same path's unmasked step; SAT with `LitesparkAdamW` taking the
kept masks equals SAT with the save-and-restore `OmittedFreezer` around the same optimizer.
"""

import copy
import math

import pytest
import torch

import litespark_hf
import litespark_kernels.ops.optim as optim_ops
from litespark_hf import LitesparkAdamW
from litespark_hf.sat import SATCallback, controller, enable_sat, frozen_omitted, sat_step
from litespark_hf.sat.core import OmittedFreezer, StepFreezer, _kept_masks, _omitted_slices, omitted_freezer
from litespark_kernels.ops.optim import adamw_step, adamw_step_reference
from tiny_models import random_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
# (shape, frozen dim or None): rows of an odd-sized weight, columns (masked tail block), a 1-D tensor over three
# blocks, a 3-D tensor frozen along its middle dimension, an unmasked tensor among masked ones, a negative dim, and
# rows of one kernel block each (blocks wholly kept: the unmasked path; wholly frozen: skipped; the kernel's layout 1,
# one flag per block), and columns of rows two blocks long (layout 2: a contiguous slice of the mask per block)
CASES = [((123, 45), 0), ((37, 129), 1), ((2 * 1024 + 77,), 0), ((6, 11, 17), 1), ((40, 30), None), ((5, 9), -1),
         ((6, 1024), 0), ((3, 2048), 1)]


def _state(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g) for s in shapes]
    ms = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    ss = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    if len(ss) > 2:
        ss[2] = None  # a tensor without a shadow
    return ps, ms, vs, ss


def _grads(seed, shapes):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _masks(seed, cases):
    g = torch.Generator().manual_seed(2000 + seed)
    out = []
    for i, (shape, dim) in enumerate(cases):
        if dim is None:
            out.append(None)
            continue
        keep = torch.rand(shape[dim], generator=g) < 0.5
        keep[0], keep[-1] = True, False  # both kinds present
        if shape == (6, 1024):
            keep = torch.tensor([True, False, True, True, False, False])
        if i == 1:
            keep = keep.to(torch.uint8)  # uint8 masks are taken too
        if i == 3:
            keep = torch.stack([keep, ~keep], 1)[:, 0]  # a strided view: copied contiguous on the way
        out.append((dim, keep))
    return out


def _kept_view(t, dim, keep):
    """(kept elements, frozen elements) of ``t`` along ``dim``."""
    keep = keep.bool()
    t = t.movedim(dim, 0)
    return t[keep], t[~keep]


def _clone(xs):
    return [None if x is None else x.clone() for x in xs]


def _run(impl, monkeypatch):
    if impl == "triton":
        monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
        return adamw_step
    return adamw_step_reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_masked_step_freezes_exactly_and_updates_the_rest_as_unmasked(impl, monkeypatch):
    step_fn = _run(impl, monkeypatch)
    shapes = [s for s, _ in CASES]
    ps, ms, vs, ss = _state(0, shapes)
    scale = torch.tensor(1.7)
    cache, plain_cache = {}, {}
    for step in (1, 2):  # a fresh mask each step (SAT's selection changes)
        gs = _grads(step, shapes)
        frozen = _masks(step, CASES)
        before = (_clone(ps), _clone(ms), _clone(vs), _clone(ss))
        kw = dict(step=step, grad_scale=scale, shadows=ss, frozen=frozen, **HP)
        if impl == "triton":
            kw["cache"] = cache
        step_fn(ps, gs, ms, vs, **kw)
        # the unmasked step from the same starting values
        ref = (_clone(before[0]), _clone(before[1]), _clone(before[2]), _clone(before[3]))
        kw = dict(step=step, grad_scale=scale, shadows=ref[3], **HP)
        if impl == "triton":
            kw["cache"] = plain_cache
        step_fn(ref[0], gs, ref[1], ref[2], **kw)
        for i, f in enumerate(frozen):
            for now, was, unmasked in zip((ps[i], ms[i], vs[i], ss[i]), (b[i] for b in before), (r[i] for r in ref)):
                if now is None:
                    continue
                if f is None:
                    assert torch.equal(now, unmasked)
                    continue
                kept_now, frozen_now = _kept_view(now, *f)
                kept_ref, _ = _kept_view(unmasked, *f)
                _, frozen_was = _kept_view(was, *f)
                assert torch.equal(frozen_now, frozen_was), (i, "frozen elements changed")
                assert torch.equal(kept_now, kept_ref), (i, "kept elements differ from the unmasked step")
                assert not torch.equal(kept_now, _kept_view(was, *f)[0])  # and they did move
    if impl == "triton":
        assert {"blocks", "table", "frozen"} <= set(cache)  # the kernel ran, with its frozen table
        assert "frozen" not in plain_cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_all_frozen_and_all_kept_masks(impl, monkeypatch):
    step_fn = _run(impl, monkeypatch)
    shapes = [(123, 45), (130, 7)]
    ps, ms, vs, _ = _state(3, shapes)
    gs = _grads(3, shapes)
    ref = (_clone(ps), _clone(ms), _clone(vs))
    frozen = [(0, torch.zeros(123, dtype=torch.bool)), (1, torch.ones(7, dtype=torch.bool))]
    step_fn(ps, gs, ms, vs, step=4, frozen=frozen, **HP)
    step_fn(ref[0][1:], gs[1:], ref[1][1:], ref[2][1:], step=4, **HP)
    for now, was in zip((ps[0], ms[0], vs[0]), (ref[0][0], ref[1][0], ref[2][0])):
        assert torch.equal(now, was)  # nothing of the fully frozen tensor moved
    for now, unmasked in zip((ps[1], ms[1], vs[1]), (ref[0][1], ref[1][1], ref[2][1])):
        assert torch.equal(now, unmasked)  # an all-True mask is the unmasked step


def test_frozen_layouts_cover_the_cases():
    from litespark_kernels.ops._adamw_triton import BLOCK, frozen_layout

    def layout(shape, dim):
        dim %= len(shape)
        return frozen_layout(math.prod(shape[dim + 1:]), shape[dim])

    assert BLOCK == 1024
    assert [layout(s, d) for s, d in CASES if d is not None] == [0, 0, 0, 0, 0, 1, 2]
    # the Llama-1B weights SAT freezes: q/k/v/gate/up rows, o/down columns
    assert layout((8192, 2048), 0) == 1 and layout((2048, 8192), 1) == 2 and layout((2048, 2048), 1) == 2
    assert layout((2048, 1000), 1) == 0 and layout((1000, 1536), 0) == 0


def test_frozen_is_validated():
    ps, ms, vs, _ = _state(4, [(8, 6), (5,)])
    gs = _grads(4, [(8, 6), (5,)])
    bad = [
        [(0, torch.ones(8, dtype=torch.bool))],  # one entry short
        [(2, torch.ones(8, dtype=torch.bool)), None],  # no such dim
        [(0, torch.ones(6, dtype=torch.bool)), None],  # wrong length
        [(1, torch.ones(6, dtype=torch.float32)), None],  # not bool/uint8
        [(0, torch.ones(8, 1, dtype=torch.bool)), None],  # not a vector
    ]
    for frozen in bad:
        with pytest.raises(ValueError, match="frozen"):
            adamw_step(ps, gs, ms, vs, step=1, frozen=frozen, **HP)


def test_litespark_adamw_set_frozen_applies_to_the_next_step_only():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(123, 20))
    b = torch.nn.Parameter(torch.randn(33))
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt = LitesparkAdamW([w, b], lr=1e-2, weight_decay=0.1)
    ref = LitesparkAdamW([w2, b2], lr=1e-2, weight_decay=0.1)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        gw, gb = torch.randn(123, 20, generator=g), torch.randn(33, generator=g)
        w.grad, b.grad, w2.grad, b2.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        ref.step()
        if s == 1:
            keep = torch.rand(123, generator=g) < 0.5
            before = (w.detach().clone(), opt.state[w]["exp_avg"].clone(), opt.state[w]["exp_avg_sq"].clone())
            opt.set_frozen({w: (0, keep), torch.nn.Parameter(torch.zeros(3)): (0, torch.ones(3, dtype=torch.bool))})
            opt.step()
            assert opt._frozen is None  # consumed
            for now, was, unmasked in zip((w, opt.state[w]["exp_avg"], opt.state[w]["exp_avg_sq"]), before,
                                          (w2, ref.state[w2]["exp_avg"], ref.state[w2]["exp_avg_sq"])):
                assert torch.equal(now[~keep], was[~keep])
                assert torch.equal(now[keep], unmasked[keep])
            assert torch.equal(b, b2)  # a parameter without a mask: the usual update
            # realign the reference with the frozen run for the next step
            with torch.no_grad():
                w2.copy_(w)
                ref.state[w2]["exp_avg"].copy_(opt.state[w]["exp_avg"])
                ref.state[w2]["exp_avg_sq"].copy_(opt.state[w]["exp_avg_sq"])
        else:
            opt.step()
        assert torch.equal(w, w2) and torch.equal(b, b2)
    assert opt.state[w]["step"].item() == 3  # the frozen step counted, as in torch
    opt.set_frozen({w: (0, torch.ones(123, dtype=torch.bool))})
    opt.set_frozen(None)  # withdrawn
    assert opt._frozen is None


# ------------------------------------------------------------------ SAT
def _sat_model(family, apply):
    model = tiny_model(family, num_hidden_layers=2)
    if apply:
        litespark_hf.apply(model, attention=False)
    enable_sat(model, sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_schedule="constant",
               sat_exempt_layers="", sat_refresh_interval=0)
    model.train()
    return model


def _sat_train(model, opt, steps, masked: bool, autocast: bool):
    freezers = []
    for s in range(steps):  # step 0 dense (refresh) builds the Adam state, the others sparse
        sat_step(model, s, steps)
        ids = random_batch(2, 16, seed=s)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        freezer = omitted_freezer(model, opt) if masked else OmittedFreezer(model, opt)
        freezers.append(type(freezer))
        opt.step()
        freezer.restore()
        opt.zero_grad()
    return freezers


def _opt_state(model, opt):
    out = {}
    for n, p in model.named_parameters():
        st = opt.state.get(p, {})
        out[n] = (p.detach(), st.get("exp_avg"), st.get("exp_avg_sq"), st.get("step"))
    return out


def _assert_same_training(a, opt_a, b, opt_b):
    sa, sb = _opt_state(a, opt_a), _opt_state(b, opt_b)
    for n in sa:
        for x, y in zip(sa[n], sb[n]):
            assert (x is None) == (y is None), n
            if x is not None:
                assert torch.equal(x, y), n


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("family", ["llama", "starcoder2"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_sat_masked_step_equals_save_and_restore(family, impl, monkeypatch):
    """SAT + LitesparkAdamW: kept masks in the step give bit-for-bit the weights and moments of the
    OmittedFreezer around the same optimizer; the omitted rows/columns did not move."""
    if impl == "triton":  # the optimizer kernel in the interpreter; the model's ops stay on their references
        monkeypatch.setattr(optim_ops, "use_triton", lambda op, *tensors: True)
    a = _sat_model(family, apply=False)
    b = copy.deepcopy(a)
    opt_a, opt_b = LitesparkAdamW(a.parameters(), lr=1e-2), LitesparkAdamW(b.parameters(), lr=1e-2)
    assert _sat_train(a, opt_a, 3, masked=True, autocast=False) == [StepFreezer] * 3
    assert _sat_train(b, opt_b, 3, masked=False, autocast=False) == [OmittedFreezer] * 3
    _assert_same_training(a, opt_a, b, opt_b)
    if impl == "triton":
        assert any("frozen" in c for c in opt_a._caches.values())  # the kernel took masks
        assert not any("frozen" in c for c in opt_b._caches.values())
    # one more sparse step: the omitted weights and moments stay exactly as they were, the kept ones move
    sat_step(a, 3, 10)
    ids = random_batch(2, 16, seed=9)
    a(input_ids=ids, labels=ids).loss.backward()
    before = {p: (p.detach().clone(), opt_a.state[p]["exp_avg"].clone()) for p, _, _ in _omitted_slices(controller(a))}
    with frozen_omitted(a, opt_a):
        opt_a.step()
    slices = _omitted_slices(controller(a))
    assert slices
    for p, dim, om in slices:
        was_p, was_m = before[p]
        assert torch.equal(p.detach().index_select(dim, om), was_p.index_select(dim, om))
        assert torch.equal(opt_a.state[p]["exp_avg"].index_select(dim, om), was_m.index_select(dim, om))
        assert not torch.equal(p.detach(), was_p)


def test_sat_masked_step_with_cast_shadow_equals_save_and_restore():
    """Litespark model with a bf16 cast shadow (the reference path, which rounds like the GPU kernel): the same
    weights, moments and shadow both ways; the masked path keeps the shadow consistent (no refill needed)."""
    a = _sat_model("llama", apply=True)
    b = copy.deepcopy(a)
    opt_a = LitesparkAdamW(a.parameters(), lr=1e-2, model=a, shadow_dtype=torch.bfloat16)
    opt_b = LitesparkAdamW(b.parameters(), lr=1e-2, model=b, shadow_dtype=torch.bfloat16)
    assert opt_a.shadow is not None and opt_b.shadow is not None
    _sat_train(a, opt_a, 4, masked=True, autocast=True)
    _sat_train(b, opt_b, 4, masked=False, autocast=True)
    _assert_same_training(a, opt_a, b, opt_b)
    assert opt_a.shadow.consistent() and not opt_b.shadow.consistent()  # b's restore bumped versions
    opt_b.shadow.fill()  # what b's next forward does
    for pa, pb in zip(opt_a.shadow.params, opt_b.shadow.params):
        va, vb = opt_a.shadow.param_views[pa], opt_b.shadow.param_views[pb]
        assert torch.equal(va, vb)
        assert torch.equal(va, pa.detach().to(torch.bfloat16))


def test_kept_masks_match_omitted_indices():
    model = _sat_model("starcoder2", apply=False)  # biases on q/k/v and c_fc
    ids = random_batch(2, 12)
    sat_step(model, 0, 10)
    model(input_ids=ids, labels=ids)
    sat_step(model, 1, 10)
    ctrl = controller(model)
    masks = {(id(p), dim): keep for p, dim, keep in _kept_masks(ctrl)}
    slices = _omitted_slices(ctrl)
    assert slices and len(masks) == len(slices)
    for p, dim, om in slices:
        keep = masks[(id(p), dim)]
        assert keep.dtype == torch.bool and keep.shape == (p.shape[dim],)
        expected = torch.ones(p.shape[dim], dtype=torch.bool)
        expected[om] = False
        assert torch.equal(keep, expected)


def test_trainer_sat_callback_hands_masks_to_litespark_adamw(tmp_path, monkeypatch):
    """SATCallback with sat_freeze_omitted and a LitesparkAdamW (inside accelerate's AcceleratedOptimizer): the
    kept masks go into the step; weights and moments equal a run forced onto the OmittedFreezer."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    import litespark_hf.sat.callback as callback_mod

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (16, 16), generator=g).tolist()})
    data = data.map(lambda r: {"labels": r["input_ids"]})
    runs = []
    for masked in (True, False):
        model = _sat_model("llama", apply=False)
        opt = LitesparkAdamW(model.parameters(), lr=1e-2)
        used = []

        def pick(model, optimizer, masked=masked, used=used):
            f = omitted_freezer(model, optimizer) if masked else OmittedFreezer(model, optimizer)
            used.append(type(f))
            return f

        monkeypatch.setattr(callback_mod, "omitted_freezer", pick)
        args = TrainingArguments(output_dir=str(tmp_path / str(masked)), max_steps=3, per_device_train_batch_size=4,
                                 use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                                 lr_scheduler_type="constant")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SATCallback()],
                          optimizers=(opt, None))
        trainer.train()
        assert used == [StepFreezer if masked else OmittedFreezer] * 3
        assert opt._frozen is None
        runs.append((model, opt))
    _assert_same_training(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
