"""FSDP2 on CPU (gloo): one worker of a 1- or 2-process run, launched by tests/test_fsdp2_cpu.py.

    python -m torch.distributed.run --nproc_per_node N tests/fsdp2_cpu_worker.py OUT_DIR [CHECK,CHECK,...]

Rank 0 writes ``OUT_DIR/results.json``: per check its measurements, or the error it raised (the test asserts on it).

``train_*`` (issue #20, speed under sharding): 5 AdamW steps (fp32, lr 1e-3) of a tiny Llama on a global batch of
4 x 33 tokens, three ways from the same seeded weights: the no-engine reference (stock ``sdpa`` model, unsharded, the
full batch in this process), stock under ``fully_shard`` and Litespark (`litespark_hf.apply`) under ``fully_shard``,
each rank on its half of the batch. Layouts: ``layers`` (each decoder layer, then the root), ``accelerate`` (what
accelerate's ``fsdp2_prepare_model`` does for TRANSFORMER_BASED_WRAP on LlamaDecoderLayer: the layers, the input
embedding alone, ``[norm, lm_head]`` without reshard after forward, the root; tied: ``[norm, embed_tokens, lm_head]``)
and ``root`` (the root only). Recorded: the losses, what the fused projections and the fused cross-entropy received
(counted by wrapping `litespark_kernels.ops.linear._FusedLinear.apply`, the reference fallback and
`litespark_kernels.fused_linear_cross_entropy`), and how many one-buffer casts (`litespark_kernels.cast_weights`) a
bf16-autocast training forward makes under the layout (and unsharded, as a control).

``trainer_*`` (issue #20, evaluate() under FSDP2): TRL's SFTTrainer through accelerate's own FSDP2 preparation (the
environment ``accelerate launch --config_file accelerate_configs/fsdp2.yaml`` sets; accelerate only turns FSDP on for
GPU-like devices, so its state is told that this gloo CPU run is FSDP), tied tiny Llama, 2 steps with an evaluation and
a sharded checkpoint at step 2, then ``trainer.evaluate()``. ``old_hooks``: with the group forward hooks of torch before
pytorch/pytorch#180428 (what the H100/H200 machines run, torch 2.11; see `_old_group_hooks`), where the stock trainer
fails exactly as seen on the H100 and litespark_hf's trainers (`litespark_hf.trainer._clear_stale_fsdp_groups`) do not.

``checkpoint_plan`` (issue #20, `checkpoint_layers="auto"` under FSDP2): see `checkpoint_plan_check`.

``optim_*`` (issue #20, `LitesparkAdamW` on FSDP2's sharded weights): ``optim_adamw``: in each layout above, a tiny
Llama with a one-output probe head (``Linear(64, 1)``: at world size 2 the second rank holds empty shards of its weight
and bias), 3 steps of `LitesparkAdamW` and of ``torch.optim.AdamW(foreach=False)`` from the same weights on the same
batches (two parameter groups, decay 0.1 and 0); recorded: the largest relative difference of the full weights
(``full_tensor()``) and of both moments, the state's types and placements, the empty shards. ``optim_state_dict``:
after 3 steps the sharded optimizer state through ``torch.distributed.checkpoint.state_dict``'s
get/set_optimizer_state_dict into a fresh `LitesparkAdamW` (and into a torch AdamW), then one more step, against
continuing with the first optimizer. ``trainer_litespark_adamw``: as ``trainer_litespark`` with "cpu" allowed for the
Trainer's FSDP2 swap to `LitesparkAdamW` (`litespark_hf.trainer._FSDP2_ADAMW_DEVICES`; on CUDA it needs nothing),
so that accelerate's prepare re-points its parameter groups at the sharded weights and the step-2 checkpoint saves
its sharded state; the gradient clip is then folded into its step (`litespark_hf.trainer._sharded_grad_norm`: the
norms it computes are recorded next to the logged ``grad_norm``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

# What `accelerate launch --config_file accelerate_configs/fsdp2.yaml` puts in the environment.
os.environ.update({
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_SYNC_MODULE_STATES": "true", "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false", "ACCELERATE_USE_CPU": "true",
})

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import litespark_kernels  # noqa: E402
import litespark_kernels.ops.linear as lk_linear  # noqa: E402
import litespark_hf  # noqa: E402
from litespark_hf.efficiency.engines import allow_fsdp_on_cpu  # noqa: E402
from tiny_models import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS, LR = 4, 33, 5, 1e-3

# ---------------------------------------------------------------------------------------------------------------
# Counting what the fused paths receive
# ---------------------------------------------------------------------------------------------------------------
SEEN: dict = {}


def _reset_seen():
    SEEN.clear()
    SEEN.update(fused_linear=0, fused_linear_weights=set(), reference=0, reference_weights=set(), flce=0,
                flce_weights=set(), cast_weights=0)


_reset_seen()
_fused_apply = lk_linear._FusedLinear.apply
_reference = lk_linear.fused_linear_reference
_flce = litespark_kernels.fused_linear_cross_entropy
_cast_weights = litespark_kernels.cast_weights


def _counted_apply(x, n, cast, *params):
    SEEN["fused_linear"] += 1
    SEEN["fused_linear_weights"].add(type(params[0]).__name__)
    return _fused_apply(x, n, cast, *params)


def _counted_reference(x, weights, biases=None):
    SEEN["reference"] += 1
    SEEN["reference_weights"].add(type(weights[0]).__name__)
    return _reference(x, weights, biases)


def _counted_flce(hidden, weight, *args, **kwargs):
    SEEN["flce"] += 1
    SEEN["flce_weights"].add(f"{type(weight).__name__}{list(weight.shape)}")
    return _flce(hidden, weight, *args, **kwargs)


def _counted_cast_weights(*args, **kwargs):
    SEEN["cast_weights"] += 1
    return _cast_weights(*args, **kwargs)


lk_linear._FusedLinear.apply = _counted_apply  # fused_linear calls _FusedLinear.apply / fused_linear_reference
lk_linear.fused_linear_reference = _counted_reference
litespark_kernels.fused_linear_cross_entropy = _counted_flce  # modules/lm_head.py: lk.fused_linear_cross_entropy
litespark_kernels.cast_weights = _counted_cast_weights  # casting.py: lk.cast_weights


def _seen() -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in SEEN.items()}


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 group forward hooks before pytorch/pytorch#180428 (torch 2.11)
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _old_group_hooks():
    """``fully_shard([a, b, c])`` hooks as before pytorch/pytorch#180428 (torch 2.11, what the GPU machines run): the
    group's pre-forward (unshard) runs only when its set of modules still to run is empty, the post-forward when the
    last module ran, and the set is cleared only at the end of a backward. Since then (torch 2.13) the pre-hook runs per
    module and finishes a group whose modules did not all run in the root's post-forward
    (``_force_complete_incomplete_states``) - the fix for exactly the case of a fused LM head that never calls
    ``lm_head``."""
    from torch.autograd.graph import _MultiHandle
    from torch.distributed.fsdp._fully_shard import _fsdp_state as S

    def register(modules, pre_hook, post_hook, modules_to_run, *_):
        modules_set = set(modules)

        def wrapped_pre_hook(*args, **kwargs):
            if len(modules_to_run) == 0:  # first to run
                modules_to_run.update(modules_set)
                return pre_hook(*args, **kwargs)
            return None

        def post(module):
            def wrapped_post_hook(*args, **kwargs):
                modules_to_run.discard(module)
                if len(modules_to_run) == 0:
                    return post_hook(*args, **kwargs)
                return None
            return wrapped_post_hook

        pre = [m.register_forward_pre_hook(wrapped_pre_hook, prepend=True, with_kwargs=True) for m in modules]
        posts = [m.register_forward_hook(post(m), prepend=False, always_call=True) for m in modules]
        return _MultiHandle(tuple(pre + posts))

    saved = S._register_group_forward_hooks, S.FSDPState.__dict__.get("_force_complete_incomplete_states")
    S._register_group_forward_hooks = register
    if saved[1] is not None:
        S.FSDPState._force_complete_incomplete_states = lambda self, output: output
    try:
        yield
    finally:
        S._register_group_forward_hooks = saved[0]
        if saved[1] is not None:
            S.FSDPState._force_complete_incomplete_states = saved[1]


# ---------------------------------------------------------------------------------------------------------------
# Training equality under fully_shard
# ---------------------------------------------------------------------------------------------------------------
def shard(model, mesh, layout: str, tied: bool):
    if layout in ("layers", "accelerate"):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
    if layout == "accelerate":  # accelerate.utils.fsdp_utils.fsdp2_prepare_model
        embed, head, norm = model.model.embed_tokens, model.lm_head, model.model.norm
        if tied:
            fully_shard([norm, embed, head], mesh=mesh, reshard_after_forward=False)
        else:
            fully_shard(embed, mesh=mesh)
            fully_shard([norm, head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(n)]


def train_losses(model, data, rows: slice | None, world: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    losses = []
    for ids in data:
        ids = ids if rows is None else ids[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if rows is not None:  # equal token counts per rank: the mean of the ranks' means is the global mean
            dist.all_reduce(loss)
            loss = loss / world
        losses.append(loss.item())
    return losses


def autocast_casts(model, ids) -> int:
    """One-buffer casts made by one bf16-autocast training forward (with labels: the fused loss path)."""
    SEEN["cast_weights"] = 0
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return SEEN["cast_weights"]


def train_check(mesh, rank, world, layout: str, tied: bool) -> dict:
    data = batches(STEPS)
    rows = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    base = tiny_model("llama", seed=0, attn_implementation="sdpa", tie_word_embeddings=tied)
    res = {"reference": train_losses(copy.deepcopy(base), data, None, world)}
    t0 = time.perf_counter()
    res["stock"] = train_losses(shard(copy.deepcopy(base), mesh, layout, tied), data, rows, world)
    res["stock_s"] = time.perf_counter() - t0
    ls = copy.deepcopy(base)
    litespark_hf.apply(ls)
    shard(ls, mesh, layout, tied)
    _reset_seen()
    t0 = time.perf_counter()
    res["litespark"] = train_losses(ls, data, rows, world)
    res["litespark_s"] = time.perf_counter() - t0
    res["seen"] = _seen()
    res["sharded_outside_forward"] = sorted({type(p).__name__ for p in ls.parameters()})
    res["casts_sharded"] = autocast_casts(ls, data[0][rows])
    plain = copy.deepcopy(base)
    litespark_hf.apply(plain)
    res["casts_unsharded"] = autocast_casts(plain, data[0][rows])
    res["n_layers"] = len(base.model.layers)
    return res


# ---------------------------------------------------------------------------------------------------------------
# checkpoint_layers="auto" on FSDP2's sharded weights
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_plan_check(mesh, rank, world) -> dict:
    """The planner on FSDP2's DTensor weights, its device memory faked (the CPU counted as a planned device type):
    for each budget a fresh copy of a 4-layer tiny Llama, Litespark applied (``checkpoint_layers="auto"``), sharded
    in accelerate's layout, transformers' checkpointing on; 3 AdamW steps on this rank's rows. Recorded: the
    placement the planner read, the layers it recomputed, its estimate, the losses and the final weights."""
    import litespark_hf.checkpointing as C

    layers = 4
    data = batches(3)
    rows = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    tokens = (GLOBAL_BATCH // world) * SEQ
    base = tiny_model("llama", seed=0, attn_implementation="sdpa", num_hidden_layers=layers)
    cfg = base.config
    per_token, boundary = C.activation_bytes_per_token(cfg), 4 * cfg.hidden_size
    weights = C.layer_weight_bytes(base.model.layers[-1])
    saved_types = C.PLANNED_DEVICE_TYPES, C.device_memory
    total = [0]
    C.PLANNED_DEVICE_TYPES = ("cuda", "cpu")
    C.device_memory = lambda device: (total[0], 0, 0)
    res = {"per_token": per_token, "weights": weights, "tokens": tokens}
    try:
        def run(budget):
            total[0] = int((budget + 1) / C.BUDGET_FRACTION) + 1
            model = copy.deepcopy(base)
            litespark_hf.apply(model)
            shard(model, mesh, "accelerate", tied=False)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            losses = train_losses(model, data, rows, world)
            planner = model.__dict__[C._STATE][0]
            full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            return {"placement": planner._placement(), "recomputed": planner.recomputed,
                    "estimate": planner.estimate, "sizes": list(planner._sizes()), "losses": losses,
                    "flags": [bool(m.gradient_checkpointing) for m in model.model.layers]}, full

        big, w_big = run(1 << 50)
        res["big"] = big
        # the budget for exactly 2 unchecked layers, from the big run's estimate (every layer unchecked)
        if big["estimate"] is not None:
            fixed = big["estimate"] - C.activation_estimate(layers, layers, tokens, per_token, boundary, weights)
            res["base"] = fixed
            mid, w_mid = run(fixed + C.activation_estimate(layers, 2, tokens, per_token, boundary, weights))
            res["mid"] = mid
            res["mid_weight_diff"] = max((w_mid[n] - w).abs().max().item() for n, w in w_big.items())
        small, w_small = run(1)
        res["small"] = small
        res["small_weight_diff"] = max((w_small[n] - w).abs().max().item() for n, w in w_big.items())
    finally:
        C.PLANNED_DEVICE_TYPES, C.device_memory = saved_types
    return res


# ---------------------------------------------------------------------------------------------------------------
# LitesparkAdamW on the sharded weights
# ---------------------------------------------------------------------------------------------------------------
class _Probed(torch.nn.Module):
    """The tiny Llama plus a one-output head on its last hidden state (a weight with fewer rows than processes)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.probe = torch.nn.Linear(lm.config.hidden_size, 1)

    def forward(self, ids):
        out = self.lm(input_ids=ids, labels=ids, output_hidden_states=True)
        return out.loss + self.probe(out.hidden_states[-1]).square().mean()


def _probed(mesh, layout: str, tied: bool):
    torch.manual_seed(3)
    model = _Probed(tiny_model("llama", seed=0, attn_implementation="sdpa", tie_word_embeddings=tied))
    shard(model.lm, mesh, layout, tied)
    return fully_shard(model, mesh=mesh)


def _groups(model):
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


def _make_opt(kind: str, model):
    if kind == "litespark":
        return litespark_hf.LitesparkAdamW(_groups(model), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(_groups(model), lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def _steps(model, opt, data, rows):
    for ids in data:
        model(ids[rows]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _full(model, opt) -> dict:
    """Full (gathered) weights and moments by parameter name."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.full_tensor()
        st = opt.state[p]
        out[n + ".exp_avg"] = st["exp_avg"].full_tensor()
        out[n + ".exp_avg_sq"] = st["exp_avg_sq"].full_tensor()
    return out


def _max_rel(a: dict, b: dict) -> dict:
    worst = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for k, x in a.items():
        y = b[k]
        kind = k.rsplit(".", 1)[-1] if k.endswith(("exp_avg", "exp_avg_sq")) else "param"
        rel = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        worst[kind] = max(worst[kind], rel)
    return worst


def optim_check(mesh, rank, world) -> dict:
    """Both optimizers step on the same gradients (the Litespark model's, copied into the torch model's shards), so
    that the comparison measures the update, not how a rounding difference grows through later gradients."""
    data = batches(3)
    rows = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    res = {}
    for layout, tied in (("layers", False), ("accelerate", False), ("accelerate", True), ("root", False)):
        model, ref = _probed(mesh, layout, tied), _probed(mesh, layout, tied)
        opt, ref_opt = _make_opt("litespark", model), _make_opt("torch", ref)
        for ids in data:
            model(ids[rows]).backward()
            for p, q in zip(model.parameters(), ref.parameters()):
                q.grad = p.grad.clone()
            opt.step()
            ref_opt.step()
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
        states = [opt.state[p] for p in model.parameters()]
        empty = torch.tensor([sum(p.to_local().numel() == 0 for p in model.parameters())])
        dist.all_reduce(empty)
        res[f"{layout}{'_tied' if tied else ''}"] = {
            "max_rel": _max_rel(_full(model, opt), _full(ref, ref_opt)),
            "steps": sorted({float(s["step"]) for s in states}),
            "step_types": sorted({f"{type(s['step']).__name__}/{s['step'].dtype}/{s['step'].device}" for s in states}),
            "ref_step_types": sorted({f"{type(s['step']).__name__}/{s['step'].dtype}/{s['step'].device}"
                                      for s in ref_opt.state.values()}),
            "moments_like_params": all(
                type(s[k]).__name__ == "DTensor" and s[k].placements == p.placements
                and s[k].device_mesh == p.device_mesh for p, s in zip(model.parameters(), states)
                for k in ("exp_avg", "exp_avg_sq")),
            "empty_local_shards": int(empty.item()),
            "n_params": len(states),
        }
    return res


def optim_frozen_check(mesh, rank, world) -> dict:
    """`LitesparkAdamW.set_frozen` masks over the full weights of DTensor parameters: rows (dim 0, the dimension
    FSDP2 shards: the mask is cut to each shard) and columns (dim 1) frozen in the second of two steps."""
    data = batches(2)
    rows = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    model, ref = _probed(mesh, "layers", False), _probed(mesh, "layers", False)
    opt, ref_opt = _make_opt("litespark", model), _make_opt("torch", ref)
    mlp = model.lm.model.layers[0].mlp
    g = torch.Generator().manual_seed(5)
    masks = {"gate_proj": (mlp.gate_proj.weight, 0), "down_proj": (mlp.down_proj.weight, 1)}
    masks = {k: (w, d, torch.rand(w.shape[d], generator=g) > 0.5) for k, (w, d) in masks.items()}
    before = {}
    for i, ids in enumerate(data):
        model(ids[rows]).backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        if i == 1:
            before = {k: [w.full_tensor()] + [opt.state[w][s].full_tensor() for s in ("exp_avg", "exp_avg_sq")]
                      for k, (w, _, _) in masks.items()}
            opt.set_frozen({w: (d, keep) for w, d, keep in masks.values()})
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    res = {}
    ref_w = dict(zip(model.parameters(), ref.parameters()))
    for k, (w, d, keep) in masks.items():
        shape = [1, 1]
        shape[d] = -1
        kept = keep.reshape(shape).expand(w.shape)
        after = [w.full_tensor()] + [opt.state[w][s].full_tensor() for s in ("exp_avg", "exp_avg_sq")]
        q = ref_w[w]
        wanted = [q.full_tensor()] + [ref_opt.state[q][s].full_tensor() for s in ("exp_avg", "exp_avg_sq")]
        res[k] = {
            "sharded_dim": [getattr(pl, "dim", None) for pl in w.placements],
            "frozen_unchanged": all(bool(torch.equal(a[~kept], b[~kept])) for a, b in zip(after, before[k])),
            "kept_max_rel": max(((a - b)[kept].abs().max() / b[kept].abs().max()).item()
                                for a, b in zip(after, wanted)),
            "n_frozen": int((~kept).sum()),
        }
    return res


def optim_state_dict_check(mesh, rank, world) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.utils._pytree import tree_map

    data = batches(4)
    rows = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    model = _probed(mesh, "accelerate", False)
    opt = _make_opt("litespark", model)
    _steps(model, opt, data[:3], rows)
    saved = tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, get_optimizer_state_dict(model, opt))
    weights = [p.to_local().clone() for p in model.parameters()]
    _steps(model, opt, data[3:], rows)
    cont = _full(model, opt)
    res = {"saved_types": sorted({type(v).__name__ for st in saved["state"].values() for v in st.values()})}
    for kind in ("litespark", "torch"):
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.to_local().copy_(w)
        fresh = _make_opt(kind, model)
        # a copy per load: load_state_dict keeps the tensors it is given, and the next step advances them in place
        set_optimizer_state_dict(model, fresh, tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, saved))
        res[f"{kind}_loaded_steps"] = sorted({float(s["step"]) for s in fresh.state.values()})
        _steps(model, fresh, data[3:], rows)
        res[f"{kind}_resumed_vs_continued"] = _max_rel(_full(model, fresh), cont)
        res[f"{kind}_resumed_steps"] = sorted({float(s["step"]) for s in fresh.state.values()})
    return res


# ---------------------------------------------------------------------------------------------------------------
# SFTTrainer train + evaluate through accelerate's FSDP2 preparation
# ---------------------------------------------------------------------------------------------------------------
def _sft_data():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)

    def rows(n):
        return [{"text": " ".join(f"t{int(i)}" for i in torch.randint(4, VOCAB, (30,), generator=g))}
                for _ in range(n)]

    return Dataset.from_list(rows(32)), Dataset.from_list(rows(8))


def trainer_check(out_dir: Path, trainer_kind: str, old_hooks: bool, cpu_adamw: bool = False) -> dict:
    """``trainer_kind``: "stock" (trl.SFTTrainer), "ours" (litespark_hf.SFTTrainer, use_litespark=False) or
    "litespark" (litespark_hf.SFTTrainer, use_litespark=True). ``cpu_adamw``: the Trainer's FSDP2 swap to
    `LitesparkAdamW` allowed on this CPU run."""
    import trl
    from accelerate.state import AcceleratorState, PartialState

    allow_fsdp_on_cpu()  # accelerate enables FSDP only for GPU-like devices
    AcceleratorState._reset_state()  # each trainer builds its accelerator afresh (the process group stays)
    cls = trl.SFTTrainer if trainer_kind == "stock" else litespark_hf.SFTTrainer
    config = trl.SFTConfig if trainer_kind == "stock" else litespark_hf.SFTConfig
    extra = {"use_litespark": True} if trainer_kind == "litespark" else {}
    out = out_dir / f"sft_{trainer_kind}_{int(old_hooks)}{'_adamw' if cpu_adamw else ''}"
    args = config(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, max_length=32, disable_tqdm=True,
        dataloader_num_workers=0, packing=True, seed=0, **extra)
    train, held_out = _sft_data()
    model = tiny_model("llama", seed=0, attn_implementation="sdpa", tie_word_embeddings=True)
    ctx = _old_group_hooks() if old_hooks else contextlib.nullcontext()
    res = {"trainer": f"{cls.__module__}.{cls.__name__}"}
    import litespark_hf.trainer as lt

    devices, sharded_norm = lt._FSDP2_ADAMW_DEVICES, lt._sharded_grad_norm
    if cpu_adamw:
        lt._FSDP2_ADAMW_DEVICES = devices + ("cpu",)
    folded = []

    def counted_norm(grads):  # the folded clip's norm over the local shards, recorded
        total = sharded_norm(grads)
        folded.append(None if total is None else total.item())
        return total

    lt._sharded_grad_norm = counted_norm
    with ctx:
        trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tiny_tokenizer())
        res["fsdp2"] = bool(trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2)
        try:
            trainer.train()
            res["train_losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            res["grad_norms"] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
            res["folded_clip_norms"] = folded
            res["eval_loss_step2"] = next(h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h)
            res["checkpoint"] = sorted(os.listdir(out / "checkpoint-2"))
            res["eval_loss"] = trainer.evaluate()["eval_loss"]
            res["embed_weight_after"] = type(trainer.model.model.embed_tokens.weight).__name__
            res["wrapped"] = type(trainer.model).__name__
            # fsdp2_forward_prefetch: how many units each decoder layer's unit prefetches in forward
            res["forward_prefetch"] = [len(getattr(layer._get_fsdp_state(), "_states_to_forward_prefetch", None) or ())
                                       for layer in trainer.model.model.layers]
            opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            res["optimizer"] = type(opt).__name__
            res["optimizer_params"] = sorted({type(p).__name__ for g in opt.param_groups for p in g["params"]})
            res["optimizer_state"] = sorted({type(s["exp_avg"]).__name__ for s in opt.state.values()})
            res["n_optimizer_params"] = sum(len(g["params"]) for g in opt.param_groups)
            res["n_model_params"] = len(list(trainer.model.parameters()))
            res["checkpoint_optimizer"] = sorted(os.listdir(out / "checkpoint-2" / "optimizer_0")) \
                if (out / "checkpoint-2" / "optimizer_0").is_dir() else None
        except Exception as e:  # recorded: the stock trainer under the old hooks is expected to fail
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-2500:]
            res["failed_in"] = "evaluate" if "train_losses" in res else "train"
        finally:
            lt._FSDP2_ADAMW_DEVICES, lt._sharded_grad_norm = devices, sharded_norm
    PartialState().wait_for_everyone()
    return res


def main():
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.set_num_threads(1)
    checks = {
        "train_layers": lambda: train_check(mesh, rank, world, "layers", tied=False),
        "train_accelerate": lambda: train_check(mesh, rank, world, "accelerate", tied=False),
        "train_accelerate_tied": lambda: train_check(mesh, rank, world, "accelerate", tied=True),
        "train_root": lambda: train_check(mesh, rank, world, "root", tied=False),
        "trainer_stock_old_hooks": lambda: trainer_check(out_dir, "stock", old_hooks=True),
        "trainer_ours_old_hooks": lambda: trainer_check(out_dir, "ours", old_hooks=True),
        "trainer_litespark_old_hooks": lambda: trainer_check(out_dir, "litespark", old_hooks=True),
        "trainer_stock": lambda: trainer_check(out_dir, "stock", old_hooks=False),
        "trainer_litespark": lambda: trainer_check(out_dir, "litespark", old_hooks=False),
        "trainer_litespark_adamw": lambda: trainer_check(out_dir, "litespark", old_hooks=False, cpu_adamw=True),
        "optim_adamw": lambda: optim_check(mesh, rank, world),
        "optim_frozen": lambda: optim_frozen_check(mesh, rank, world),
        "optim_state_dict": lambda: optim_state_dict_check(mesh, rank, world),
        "checkpoint_plan": lambda: checkpoint_plan_check(mesh, rank, world),
    }
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(checks)
    results = {"world_size": world, "torch": torch.__version__}
    for name in only:
        t0 = time.perf_counter()
        try:
            results[name] = checks[name]()
        except Exception as e:  # recorded for the test; the other checks still run
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = time.perf_counter() - t0
        dist.barrier()
    if rank == 0:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
