"""FSDP2 + Litespark on CPU: one worker of a 2-process gloo run, launched by tests/test_distributed_cpu.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_cpu_worker.py OUT_DIR

Every rank builds the same seeded tiny Llama twice: a stock reference (``attn_implementation="sdpa"``, no Litespark,
unsharded, run on the FULL global batch in this process) and a Litespark copy (`litespark_hf.apply`: the fused
linear cross-entropy runs inside the LM head's forward) that is sharded with ``fully_shard`` (decoder layers,
lm_head, root) on a CPU device mesh and sees only this rank's half of the batch. Rank 0 writes ``OUT_DIR/results.json``
with the measured errors of every check; a check that raised is recorded with its error (the test asserts on it).

Checks (``results[name]``):
- ``untied``: loss (the global mean, reduced over ranks), every parameter's full gradient (``DTensor.full_tensor()``),
  then one AdamW step on both models and the logits of this rank's rows (eval mode, no labels -> plain LM head).
- ``untied_num_items``: the Trainer's token-averaged loss: labels with -100 (different counts per rank),
  ``num_items_in_batch`` = the global count, loss scaled by the world size (FSDP2 averages gradients over ranks).
- ``tied``: ``tie_word_embeddings=True`` with only the root wrapped (embedding and lm_head in one FSDP unit).
- ``tied_lm_head_wrapped``: tied embeddings with layers and lm_head wrapped separately (recorded, a known failure).
- ``tied_grouped``: tied embeddings, layers wrapped, ``fully_shard([embed_tokens, lm_head])`` as one unit, root.
- ``checkpoint``: the full state dict (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) saved by
  rank 0 with ``save_pretrained`` and reloaded with a plain ``AutoModelForCausalLM.from_pretrained``: logits equal
  to the sharded model's.
"""

from __future__ import annotations

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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import litespark_hf  # noqa: E402
from litespark_hf.modules import LitesparkLMHead  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402

GLOBAL_BATCH, SEQ = 4, 33  # odd sequence length

# What the fused linear cross-entropy receives as the LM-head weight: it must be the gathered (unsharded, plain
# tensor, full [vocab, hidden]) weight, i.e. FSDP2 unsharded the unit holding lm_head around the head's forward.
import litespark_kernels  # noqa: E402

SEEN_WEIGHTS: list = []
_flce = litespark_kernels.fused_linear_cross_entropy


def _recording_flce(hidden, weight, *args, **kwargs):
    SEEN_WEIGHTS.append((type(weight).__name__, list(weight.shape)))
    return _flce(hidden, weight, *args, **kwargs)


litespark_kernels.fused_linear_cross_entropy = _recording_flce  # modules/lm_head.py calls lk.fused_linear_cross_entropy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def build_pair(tied: bool):
    """(stock reference, litespark copy with identical weights)."""
    ref = tiny_model("llama", seed=0, attn_implementation="sdpa", tie_word_embeddings=tied)
    ls = copy.deepcopy(ref)
    litespark_hf.apply(ls)
    assert isinstance(ls.lm_head, LitesparkLMHead), type(ls.lm_head)
    return ref, ls


def shard(model, mesh, lm_head: bool | str, layers: bool = True):
    """Wrap the decoder layers (optional), lm_head (True: alone; "group": with the input embedding in one FSDP unit,
    what tied weights need) and the root."""
    if layers:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
    if lm_head == "group":
        fully_shard([model.model.embed_tokens, model.lm_head], mesh=mesh)
    elif lm_head:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def global_batch(seed: int, pad: bool):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = ids.clone()
    if pad:  # rows end in ignored tokens, uneven between the two ranks' halves
        for row, n in enumerate((0, 7, 20, 3)):
            if n:
                labels[row, -n:] = -100
    return ids, labels


def grads_check(mesh, rank, world, tied: bool, pad: bool, step: bool, lm_head: bool | str | None = None) -> dict:
    torch.manual_seed(0)
    ref, ls = build_pair(tied)
    shard(ls, mesh, lm_head=not tied if lm_head is None else lm_head, layers=not tied or bool(lm_head))
    ids, labels = global_batch(seed=1, pad=pad)
    rows = GLOBAL_BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    ref.train(), ls.train()

    # Stock reference on the full batch: the mean over all (non-ignored) tokens.
    n_items = int((labels[:, 1:] != -100).sum())
    if pad:
        ref_loss = ref(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
    else:
        ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()

    SEEN_WEIGHTS.clear()
    t0 = time.perf_counter()
    if pad:  # the Trainer's recipe: global item count, loss x world size (FSDP2 averages gradients over ranks)
        out = ls(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=torch.tensor(n_items))
        local = out.loss * world
    else:  # equal token counts per rank: the mean of the ranks' means is the global mean
        out = ls(input_ids=ids[mine], labels=labels[mine])
        local = out.loss
    assert out.logits is None, "the fused path must not build logits"
    local.backward()
    fwd_bwd_s = time.perf_counter() - t0
    loss = local.detach().clone()
    dist.all_reduce(loss)
    loss = loss / world

    res = {"loss_ref": ref_loss.item(), "loss": loss.item(), "loss_rel": abs(loss.item() - ref_loss.item())
           / abs(ref_loss.item()), "fwd_bwd_s": fwd_bwd_s, "head_weight_seen": list(SEEN_WEIGHTS),
           "head_weight_local_shape": list(ls.lm_head.weight.to_local().shape)}
    ref_params = dict(ref.named_parameters())
    grad_rel = {}
    for name, p in ls.named_parameters():
        assert isinstance(p, DTensor), f"{name} is not sharded"
        g = full(p.grad)
        grad_rel[name] = rel(g, ref_params[name].grad)
    res["grad_rel"] = grad_rel
    res["grad_rel_max"] = max(grad_rel.values())
    res["n_params"] = len(grad_rel)
    res["n_ref_params"] = len(ref_params)

    if step:
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt_ls = torch.optim.AdamW(ls.parameters(), lr=1e-2)
        opt_ref.step(), opt_ls.step()
        res["weight_rel_max"] = max(rel(full(p.detach()), ref_params[n].detach()) for n, p in ls.named_parameters())
        res["weight_changed"] = max(rel(ref_params[n].detach(), p0) for n, p0 in
                                    ((n, p0) for n, p0 in _initial(tied).items()))
        ref.eval(), ls.eval()
        with torch.no_grad():
            ref_logits = ref(input_ids=ids).logits[mine]
            logits = ls(input_ids=ids[mine]).logits
        err = torch.tensor(rel(logits, ref_logits), dtype=torch.float64)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        res["logits_rel_after_step"] = err.item()
    return res


_INIT: dict = {}


def _initial(tied: bool) -> dict:
    if tied not in _INIT:
        m = tiny_model("llama", seed=0, attn_implementation="sdpa", tie_word_embeddings=tied)
        _INIT[tied] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return _INIT[tied]


def checkpoint_check(mesh, rank, world, out_dir: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    ref, ls = build_pair(tied=False)
    shard(ls, mesh, lm_head=True)
    ids, labels = global_batch(seed=2, pad=False)
    rows = GLOBAL_BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    # Train one step so the saved weights are not the seeded initial ones.
    ls.train()
    ls(input_ids=ids[mine], labels=labels[mine]).loss.backward()
    torch.optim.AdamW(ls.parameters(), lr=1e-2).step()

    t0 = time.perf_counter()
    sd = get_model_state_dict(ls, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = out_dir / "ckpt"
    n_keys = len(sd)  # save_pretrained empties the dict it is given
    if rank == 0:
        assert not any(isinstance(v, DTensor) for v in sd.values())
        ls.save_pretrained(path, state_dict=sd)
    dist.barrier()
    save_s = time.perf_counter() - t0
    ls.eval()
    with torch.no_grad():
        logits = ls(input_ids=ids[mine]).logits
    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    plain.eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=ids).logits[mine]
    err = torch.tensor(rel(logits, plain_logits), dtype=torch.float64)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return {"logits_rel": err.item(), "save_s": save_s, "n_keys": n_keys, "files": sorted(os.listdir(path)),
            "plain_class": type(plain).__name__,
            "trained": rel(dict(plain.named_parameters())["lm_head.weight"],
                           _initial(False)["lm_head.weight"])}


def main():
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.set_num_threads(1)
    checks = {
        "untied": lambda: grads_check(mesh, rank, world, tied=False, pad=False, step=True),
        "untied_num_items": lambda: grads_check(mesh, rank, world, tied=False, pad=True, step=False),
        "tied": lambda: grads_check(mesh, rank, world, tied=True, pad=False, step=True),
        # Known limitation (not asserted): tied embeddings with lm_head in its own FSDP unit.
        "tied_lm_head_wrapped": lambda: grads_check(mesh, rank, world, tied=True, pad=False, step=False, lm_head=True),
        "tied_grouped": lambda: grads_check(mesh, rank, world, tied=True, pad=False, step=True, lm_head="group"),
        "checkpoint": lambda: checkpoint_check(mesh, rank, world, out_dir),
    }
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(checks)
    results = {"world_size": world}
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
