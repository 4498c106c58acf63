"""The recipes' held-out figures: perplexity, greedy exact match on conversational prompts (SFT) and summed
completion log-probabilities (DPO's preference accuracy)."""

from __future__ import annotations

import math

import torch

from .data import column_names


def single_process_model(trainer):
    """The full model when every process holds one (no FSDP / DeepSpeed sharding), else None."""
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    return trainer.accelerator.unwrap_model(trainer.model)


def whole_parameters(model) -> bool:
    """False when the model was loaded partitioned (DeepSpeed ZeRO-3's ``zero3_init``: parameters with ``ds_id``,
    gathered only inside the engine's forward), so it cannot run on its own before training."""
    return not any(hasattr(p, "ds_id") for p in model.parameters())


PROBE_ENV = "LITESPARK_LOGITS_PROBE"


def probe_ids(vocab_size: int, batch: int = 2, seq: int = 32) -> torch.Tensor:
    """A fixed batch of token ids (no randomness) for comparing a trained model with its saved copy."""
    return (torch.arange(batch * seq).reshape(batch, seq) * 7919 + 13) % vocab_size


@torch.no_grad()
def write_logits_probe(trainer, path: str) -> None:
    """fp32 logits of the trained in-run model (sharded or not) on `probe_ids`, saved to ``path`` by the main process.

    Every process runs the forward (FSDP2 unshards and ZeRO-3 gathers through collectives); ``benchmarks/
    engines_check.py`` loads the saved model with plain ``from_pretrained`` and compares its logits with these.
    Written when the environment variable ``LITESPARK_LOGITS_PROBE`` names a file (`save_all`)."""
    model = trainer.model
    vocab = trainer.accelerator.unwrap_model(model).config.get_text_config().vocab_size
    ids = probe_ids(vocab).to(trainer.args.device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    finally:
        model.train(was_training)
    if trainer.is_world_process_zero():
        torch.save({"input_ids": ids.cpu(), "logits": logits}, path)


def _chat_ids(tokenizer, messages, add_generation_prompt):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


@torch.no_grad()
def greedy_exact_match(model, tokenizer, prompts: list, answers: list[str], max_new_tokens: int = 8,
                       batch_size: int = 64) -> tuple[float, list[str]]:
    """Fraction of conversational ``prompts`` whose greedy answer equals ``answers`` (whitespace-stripped)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outs = []
    for i in range(0, len(prompts), batch_size):
        ids = [_chat_ids(tokenizer, p, True) for p in prompts[i:i + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                             use_cache=True)
        outs += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    model.train(was_training)
    em = sum(o == a.strip() for o, a in zip(outs, answers)) / max(len(answers), 1)
    return em, outs


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list, completions: list, batch_size: int = 64) -> torch.Tensor:
    """Summed log-probability of each conversational completion given its prompt (chat template applied)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for p, c in zip(prompts, completions):
        prompt_ids = _chat_ids(tokenizer, p, True)
        full = _chat_ids(tokenizer, list(p) + list(c), False)
        rows.append((full, len(prompt_ids)))
    out = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        width = max(len(f) for f, _ in part)
        ids = torch.tensor([f + [tokenizer.pad_token_id] * (width - len(f)) for f, _ in part], device=device)
        mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f, _ in part], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = torch.zeros_like(logp)
        for j, (f, n_prompt) in enumerate(part):
            keep[j, n_prompt - 1:len(f) - 1] = 1
        out.append((logp * keep).sum(-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def conversational_eval_pairs(ds, n: int):
    """``(prompts, answers)`` from the first ``n`` rows of a conversational held-out set (last assistant turn =
    answer), or None when the rows are not conversational."""
    if ds is None or n <= 0:
        return None
    names = column_names(ds)
    rows = ds.select(range(min(n, len(ds)))) if hasattr(ds, "select") else list(ds.take(n))
    prompts, answers = [], []
    for r in rows:
        if "messages" in names and isinstance(r["messages"], list) and r["messages"] and \
                r["messages"][-1].get("role") == "assistant":
            prompts.append(r["messages"][:-1])
            answers.append(r["messages"][-1]["content"])
        elif "prompt" in names and "completion" in names and isinstance(r["prompt"], list):
            prompts.append(r["prompt"])
            answers.append(r["completion"][-1]["content"])
        else:
            return None
    return prompts, answers
