"""TRL's SFTTrainer, stock and with ``use_litespark=True``: per step the same loss and the same gradient (before
clipping) of every trainable parameter, fp32 on the CPU (``bf16=False``), with TRL's default gradient checkpointing,
in the post-training modes of issue #14: padded batches (TRL's collator pads on the right; Litespark runs the
decoder on the real tokens only), ``padding_free``, ``packing``, LoRA on all linear layers, and the two loss masks,
``completion_only_loss`` (prompt-completion rows) and ``assistant_only_loss`` (conversations under a chat template
with ``{% generation %}`` markers). The masks must survive the unpadding: a run that trained on the prompt tokens
too would give other losses and gradients (checked against a run without the mask)."""

from __future__ import annotations

import copy

import pytest
import torch

from litespark_hf.efficiency import post_bench as PB
from litespark_hf.efficiency import post_data as PD
from tiny_models import record_training_steps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STEPS = 3
BATCH = 3
# a template whose assistant turns (content and end-of-turn id) are the generation: what assistant_only_loss trains
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} t2 "
            "{% endgeneration %}{% else %}t1 {{ m['content'] }} {% endif %}{% endfor %}")


def _conversations(n: int, seed: int) -> list[dict]:
    """Two-turn conversations of random words ("t4" ... "t127") with long-tailed lengths."""
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"t{int(i)}" for i in torch.randint(4, 128, (k,), generator=g))

    rows = []
    for _ in range(n):
        a, b, c, d = (int(x) for x in torch.randint(1, 12, (4,), generator=g))
        rows.append({"messages": [{"role": "user", "content": words(a)},
                                  {"role": "assistant", "content": words(b)},
                                  {"role": "user", "content": words(c)},
                                  {"role": "assistant", "content": words(d * 2)}]})
    return rows


def _word_tokenizer():
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _run(litespark: bool, tmp_path, model, dataset, tokenizer, lora: bool = False, on_trainer=None, **cfg):
    import trl
    from peft import LoraConfig

    import litespark_hf

    Config, Trainer = (litespark_hf.SFTConfig, litespark_hf.SFTTrainer) if litespark else (trl.SFTConfig,
                                                                                             trl.SFTTrainer)
    extra = {"use_litespark": True} if litespark else {}
    args = Config(output_dir=str(tmp_path / ("lit" if litespark else "stock")), max_steps=STEPS, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                  per_device_train_batch_size=BATCH, learning_rate=1e-3, bf16=False, dataloader_num_workers=0,
                  **{"max_length": 64, **cfg}, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=LoraConfig(**PB.LORA, lora_dropout=0.0) if lora else None)
    trainer._get_train_sampler = lambda train_dataset=None: torch.utils.data.SequentialSampler(trainer.train_dataset)
    losses, batches = [], []

    def after_step(loss, batch):
        losses.append(loss.item())
        batches.append(batch)

    grads = record_training_steps(trainer, after_step)
    if on_trainer is not None:
        on_trainer(trainer)
    trainer.train()
    return losses, grads, batches


def _base():
    from transformers import AutoModelForCausalLM

    from litespark_hf.efficiency.bench import _hf_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_hf_config(PB.CONFIGS["tiny"]), attn_implementation="sdpa",
                                            dtype=torch.float32)


def _prompt_completion(seed: int = 5):
    import datasets

    cfg = PB.CONFIGS["tiny"]
    rows = PD.sft_rows(BATCH * STEPS, cfg["max_length"], int(cfg["model"]["vocab_size"]), seed=seed)
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "completion_mask")})


def _assert_equal(stock, lit, lora=False):
    (ls, gs_all, bs), (ll, gl_all, bl) = stock, lit
    assert len(ls) == len(ll) == STEPS and len(gs_all) == len(gl_all) == STEPS
    for a, b in zip(bs, bl):  # the same batches went in
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for i, (a, b) in enumerate(zip(ls, ll)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (i, a, b)
    for step, (gs, gl) in enumerate(zip(gs_all, gl_all)):
        assert gs.keys() == gl.keys() and len(gs) > 0
        if lora:
            assert all("lora_" in n for n in gs)
        # fp32 sums in another order (the real tokens packed into one row): seen up to 4e-5 of a gradient's largest
        # element and 2e-5 of its norm; held to 1e-4 of both (the bound of the other equivalence tests)
        for name, g in gs.items():
            scale = float(g.abs().max())
            torch.testing.assert_close(gl[name], g, rtol=1e-4, atol=1e-4 * scale + 1e-12, msg=f"step {step}: {name}")
            assert float((gl[name] - g).norm()) <= 1e-4 * max(float(g.norm()), 1e-12), (step, name)


MODES = {
    "padded": {},
    "padding_free": {"padding_free": True, "max_length": None},
    "packing": {"packing": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_sft_completion_only_litespark_equals_stock_per_step(mode, tmp_path):
    base, data, tok = _base(), _prompt_completion(), PD.id_tokenizer(PB.CONFIGS["tiny"]["model"]["vocab_size"])
    stock = _run(False, tmp_path, copy.deepcopy(base), data, tok, completion_only_loss=True, **MODES[mode])
    lit = _run(True, tmp_path, copy.deepcopy(base), data, tok, completion_only_loss=True, **MODES[mode])
    _assert_equal(stock, lit)
    batch = lit[2][0]
    if mode == "padded":  # right-padded rows of different lengths: the unpadding had pads to remove
        mask = batch["attention_mask"]
        assert mask.shape[0] == BATCH and (mask == 0).any() and len(set(mask.sum(1).tolist())) > 1
    else:  # one flattened row; the documents are told apart by position_ids
        assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) > 1
    # the prompt tokens are masked out of the loss (completion_mask -> labels -100)
    assert (batch["labels"] == -100).sum() > (batch["input_ids"] == 0).sum()


def test_sft_lora_litespark_equals_stock_per_step(tmp_path):
    base, data, tok = _base(), _prompt_completion(), PD.id_tokenizer(PB.CONFIGS["tiny"]["model"]["vocab_size"])
    stock = _run(False, tmp_path, copy.deepcopy(base), data, tok, lora=True, completion_only_loss=True)
    lit = _run(True, tmp_path, copy.deepcopy(base), data, tok, lora=True, completion_only_loss=True)
    _assert_equal(stock, lit, lora=True)


@pytest.mark.parametrize("mode", ["padded", "padding_free"])
def test_sft_assistant_only_loss_litespark_equals_stock_per_step(mode, tmp_path):
    import datasets

    data = datasets.Dataset.from_list(_conversations(BATCH * STEPS, seed=11))
    base = _base()
    cfg = {"assistant_only_loss": True, **MODES[mode]}
    stock = _run(False, tmp_path / "a", copy.deepcopy(base), data, _word_tokenizer(), **cfg)
    lit = _run(True, tmp_path / "a", copy.deepcopy(base), data, _word_tokenizer(), **cfg)
    _assert_equal(stock, lit)
    labels, ids = lit[2][0]["labels"], lit[2][0]["input_ids"]
    trained = labels != -100
    assert trained.any() and (~trained & (ids != 0)).any()  # some real tokens (the user turns) are not trained on
    assert bool((ids[trained] == 2).any())  # the assistant's end-of-turn id is
    # without the mask the same batches train on every token: other losses (so the comparison above saw the mask)
    full = _run(True, tmp_path / "b", copy.deepcopy(base), data, _word_tokenizer(), **MODES[mode])
    assert abs(full[0][0] - lit[0][0]) > 1e-3


# what makes the host wait for the device on CUDA: reads of a value (bool(), .item()) and nonzero (its output size)
_READS = ("_local_scalar_dense", "is_nonzero", "item", "nonzero")


@pytest.mark.parametrize("mode", ["padded", "padding_free"])
def test_sft_decoder_forwards_read_no_device_value(mode, tmp_path):
    """The decoder stack's forward in Litespark SFT training reads no device value on the host, so the host need not
    wait for the previous step's backward and optimizer before launching the first layer: a padded batch's real-token
    count comes from the collator (`unpadding.TokenCountingCollator`, gathered with ``nonzero_static``), a
    padding-free batch's documents from ``cu_seq_lens_q`` (no look at ``position_ids``). The losses still equal
    stock's (the same run as the equality tests)."""
    from tiny_models import OpLog

    from litespark_hf.patching import unwrap_model

    forwards = []

    def watch(trainer):
        stack = unwrap_model(trainer.model).model
        while not hasattr(stack, "layers"):  # PEFT-free here, but keep to the decoder stack
            stack = stack.model

        def enter(module, args, kwargs):
            forwards.append(OpLog().__enter__())

        def leave(module, args, kwargs, output):
            forwards[-1].__exit__(None, None, None)

        stack.register_forward_pre_hook(enter, with_kwargs=True, prepend=True)  # before the unpadding's own hook
        stack.register_forward_hook(leave, with_kwargs=True)

    base, data, tok = _base(), _prompt_completion(), PD.id_tokenizer(PB.CONFIGS["tiny"]["model"]["vocab_size"])
    stock = _run(False, tmp_path, copy.deepcopy(base), data, tok, completion_only_loss=True, **MODES[mode])
    lit = _run(True, tmp_path, copy.deepcopy(base), data, tok, completion_only_loss=True, on_trainer=watch,
               **MODES[mode])
    _assert_equal(stock, lit)
    # TRL's default gradient checkpointing: no layer is recomputed by the planner at this size, one forward a step
    assert len(forwards) >= STEPS
    for ops in forwards:
        assert not any(ops.counts[name] for name in _READS), {n: ops.counts[n] for n in _READS}
        if mode == "padded":  # the batch had pads: they were gathered out with the count the collator gave
            assert ops.counts["nonzero_static"] == 1
        else:
            assert ops.counts["searchsorted"] >= 1  # segment ids from cu_seq_lens_q
