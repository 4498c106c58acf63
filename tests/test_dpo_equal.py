"""TRL's DPOTrainer, stock and with ``use_litespark=True`` (lean bookkeeping, one-node LoRA groups): per step the
same losses, chosen/rejected log-probs and gradients (before clipping) of every trainable parameter, LoRA adapters
and full fine-tuning with a frozen reference copy, fp32 on the CPU (``bf16=False``: TRL's configs default to bf16,
which on the CPU is autocast), with TRL's default gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from litespark_hf.efficiency import post_bench as PB
from litespark_hf.efficiency import post_data as PD
from tiny_models import record_training_steps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STEPS = 3
_EXTRA: dict = {}  # further config arguments for both runs, and for the Litespark run only
_LIT_EXTRA: dict = {}


def _run(lora: bool, litespark: bool, tmp_path, model, dataset):
    import trl
    from peft import LoraConfig

    import litespark_hf

    Config, Trainer = (litespark_hf.DPOConfig, litespark_hf.DPOTrainer) if litespark else (trl.DPOConfig,
                                                                                             trl.DPOTrainer)
    extra = {"use_litespark": True, **_LIT_EXTRA} if litespark else {}
    args = Config(output_dir=str(tmp_path / ("lit" if litespark else "stock")), max_steps=STEPS, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                  per_device_train_batch_size=2, max_length=64, learning_rate=1e-3, bf16=False, **extra, **_EXTRA)
    logps = []
    ref = None if lora else copy.deepcopy(model).eval().requires_grad_(False)
    trainer = Trainer(model=model, ref_model=ref, args=args, train_dataset=dataset,
                      processing_class=PD.id_tokenizer(model.config.vocab_size),
                      peft_config=LoraConfig(**PB.LORA, lora_dropout=0.0) if lora else None,
                      )
    trainer._get_train_sampler = lambda train_dataset=None: torch.utils.data.SequentialSampler(trainer.train_dataset)
    def after_step(loss, batch):
        m = trainer._metrics["train"]
        logps.append((loss.item(), m["logps/chosen"][-1], m["logps/rejected"][-1]))

    grads = record_training_steps(trainer, after_step)
    trainer.train()
    return grads, logps


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dpo_litespark_equals_stock_per_step(lora, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    from litespark_hf.efficiency.bench import _hf_config

    torch.manual_seed(0)
    cfg = PB.CONFIGS["tiny"]
    base = AutoModelForCausalLM.from_config(_hf_config(cfg), attn_implementation="sdpa", dtype=torch.float32)
    rows = PD.dpo_rows(2 * STEPS, cfg["max_length"], int(cfg["model"]["vocab_size"]), seed=3)
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    stock = _run(lora, False, tmp_path, copy.deepcopy(base), dataset)
    lit = _run(lora, True, tmp_path, copy.deepcopy(base), dataset)
    assert len(stock[0]) == len(lit[0]) == STEPS
    for (ls, cs, rs), (ll, cl, rl) in zip(stock[1], lit[1]):
        assert abs(ls - ll) <= 1e-5 and abs(cs - cl) <= 1e-3 and abs(rs - rl) <= 1e-3
    for step, (gs, gl) in enumerate(zip(*(r[0] for r in (stock, lit)))):
        assert gs.keys() == gl.keys() and len(gs) > 0
        if lora:
            assert all("lora_" in n for n in gs)  # only the adapters train
        # (LoRA starts with B = 0, so the A's get no gradient in the first step)
        assert sum(bool(g.abs().sum() > 0) for g in gs.values()) >= (len(gs) // 2 if step == 0 else len(gs))
        for name, g in gs.items():
            torch.testing.assert_close(gl[name], g, rtol=1e-4, atol=1e-7, msg=f"step {step}: {name}")
