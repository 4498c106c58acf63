"""SAT quality check: continual pre-training (CPT) of a small pre-trained model, ladder SAT vs dense training at the
same number of steps, compared on held-out loss.

Self-contained and offline (CPU is fine): the corpus is the source code of Python's standard library, byte-level
(vocabulary 256). Stage 1 pre-trains a tiny Llama densely on one half of the modules; stage 2 continues training on
the other half (a shifted domain) twice from that same checkpoint, with the same batches: dense, and SAT with the
ladder schedule (LORS) ending dense. Prints the held-out loss of each and the relative gap.

    python benchmarks/sat_quality.py                 # full version (a few minutes on 2 CPU cores)
    python benchmarks/sat_quality.py --quick         # the shortened version asserted in tests/test_sat_quality.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sysconfig
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from litespark_hf.sat import enable_sat, executed_flops_fraction, frozen_omitted, sat_step


def stdlib_corpus(max_bytes: int = 3_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(domain A, domain B) byte tensors: stdlib modules whose names sort before / after 'm'."""
    root = sysconfig.get_paths()["stdlib"]
    a, b = bytearray(), bytearray()
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.endswith(".py") or not os.path.isfile(path):
            continue
        data = open(path, "rb").read()
        target = a if name.lower() < "m" else b
        if len(target) < max_bytes:
            target += data
    return torch.tensor(list(a), dtype=torch.long), torch.tensor(list(b), dtype=torch.long)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, seq: int, n: int = 32) -> float:
    model.eval()
    losses = []
    for ids in batches(data, n // 8, 8, seq, seed=1234):
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    model.train()
    return sum(losses) / len(losses)


def train(model, data, steps, batch, seq, lr, seed, sat: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    fractions = []
    for step, ids in enumerate(batches(data, steps, batch, seq, seed)):
        if sat:
            sat_step(model, step, steps)
            fractions.append(executed_flops_fraction(model, seq))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if sat:
            with frozen_omitted(model, opt):
                opt.step()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return sum(fractions) / len(fractions) if fractions else 1.0


def run(quick: bool = False, rate_mlp: float = 0.5, rate_heads: float = 0.5, schedules=("ladder",),
        verbose: bool = True) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    a, b = stdlib_corpus(1_000_000 if quick else 3_000_000)
    split = int(0.9 * b.numel())
    b_train, b_held = b[:split], b[split:]
    seq, batch = (64, 8) if quick else (128, 16)
    pre_steps, cpt_steps = (40, 30) if quick else (300, 200)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=96 if quick else 128, intermediate_size=256 if quick else 384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, use_cache=False,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    t0 = time.time()
    train(model, a, pre_steps, batch, seq, 3e-3, seed=0, sat=False)
    result = {"config": {"quick": quick, "seq": seq, "batch": batch, "pretrain_steps": pre_steps,
                         "cpt_steps": cpt_steps, "rate_mlp": rate_mlp, "rate_heads": rate_heads,
                         "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers},
              "pretrained_held_out": held_out_loss(model, b_held, seq)}
    dense = copy.deepcopy(model)
    train(dense, b_train, cpt_steps, batch, seq, 1e-3, seed=1, sat=False)
    result["dense"] = held_out_loss(dense, b_held, seq)
    for schedule in schedules:
        sat = copy.deepcopy(model)
        enable_sat(sat, sat_omission_rate_mlp=rate_mlp, sat_omission_rate_heads=rate_heads, sat_schedule=schedule)
        frac = train(sat, b_train, cpt_steps, batch, seq, 1e-3, seed=1, sat=True)
        loss = held_out_loss(sat, b_held, seq)
        result[f"sat_{schedule}"] = loss
        result[f"sat_{schedule}_rel_gap"] = (loss - result["dense"]) / result["dense"]
        result[f"sat_{schedule}_mean_executed_flops_fraction"] = frac
    result["seconds"] = time.time() - t0
    if verbose:
        print(json.dumps(result, indent=1))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate_mlp", type=float, default=0.5)
    ap.add_argument("--rate_heads", type=float, default=0.5)
    ap.add_argument("--schedules", default="ladder,constant")
    args = ap.parse_args()
    r = run(args.quick, args.rate_mlp, args.rate_heads, tuple(args.schedules.split(",")))
    print(f"\npre-trained model, held-out loss on domain B: {r['pretrained_held_out']:.4f}")
    print(f"{'CPT variant':22s} {'held-out loss':>13s} {'vs dense':>9s} {'mean exec FLOPs':>16s}")
    print(f"{'dense':22s} {r['dense']:13.4f} {'':>9s} {1.0:16.3f}")
    for s in args.schedules.split(","):
        print(f"{'SAT ' + s:22s} {r['sat_' + s]:13.4f} {r['sat_' + s + '_rel_gap']:+9.2%} "
              f"{r['sat_' + s + '_mean_executed_flops_fraction']:16.3f}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
