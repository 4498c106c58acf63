"""The registry, the architecture table, apply/restore, PEFT, and the trainer flags stay consistent."""

import copy
import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import litespark_hf
from litespark_hf import ARCHITECTURES, LitesparkConfig
from litespark_hf.architectures import SWAP_KINDS
from litespark_hf.attention import litespark_attention_forward, litespark_mask
from litespark_hf.modules import original_class
from tiny_models import FAMILIES, random_batch, tiny_config, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_backend_and_mask_function_are_registered():
    assert ALL_ATTENTION_FUNCTIONS["litespark"] is litespark_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["litespark"] is litespark_mask
    assert "flash" not in litespark_hf.ATTENTION_NAME  # "flash" in a name switches on flash-attention code paths


FAMILIES_IN_TABLE = {"llama", "mistral", "qwen2", "qwen3", "starcoder2", "gemma2", "gemma3", "gemma3_text", "phi3",
                     "smollm3", "olmo2", "olmo3", "granite", "ministral", "mixtral", "qwen2_moe", "qwen3_moe",
                     "gpt_oss"}


def test_table_covers_the_families_and_every_class_resolves():
    assert set(ARCHITECTURES) == FAMILIES_IN_TABLE
    config_fields = {f.name for f in dataclasses.fields(LitesparkConfig)}
    for arch in ARCHITECTURES.values():
        resolved = arch.resolve()
        assert len(resolved) == len(arch.swaps)
        for cls, kind in resolved.items():
            assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
            switch, mixin = SWAP_KINDS[kind]
            # a mixin changes the forward, or (Gemma3's text model) tells the unpadding to keep a batch padded
            assert switch in config_fields and (hasattr(mixin, "forward") or hasattr(mixin, "litespark_keeps_padding"))


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_swaps_every_listed_module_once_and_shares_weights(family):
    model = tiny_model(family)
    before = {name: p for name, p in model.named_parameters()}
    resolved = ARCHITECTURES[family].resolve()
    expected = {}
    for m in model.modules():
        if type(m) in resolved:
            expected[resolved[type(m)]] = expected.get(resolved[type(m)], 0) + 1
    litespark_hf.apply(model)
    assert litespark_hf.swapped_counts(model) == expected
    assert model.config._attn_implementation == "litespark"
    for name, p in model.named_parameters():
        assert p is before[name]  # same Parameter objects: nothing copied
    sd_keys = set(model.state_dict())
    ids = random_batch()
    model.eval()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        litespark_hf.apply(model)  # applying twice is harmless
        assert litespark_hf.swapped_counts(model) == expected
        assert torch.equal(model(input_ids=ids).logits, first)
    assert set(model.state_dict()) == sd_keys


@pytest.mark.parametrize("family", ["llama", "starcoder2"])
def test_restore_gives_back_the_stock_model(family):
    stock = tiny_model(family, attn_implementation="sdpa")
    model = copy.deepcopy(stock)
    litespark_hf.apply(model)
    litespark_hf.restore(model)
    assert not litespark_hf.is_applied(model)
    assert model.config._attn_implementation == "sdpa"
    for a, b in zip(stock.modules(), model.modules()):
        assert type(a) is type(b) and original_class(b) is None


def test_unsupported_architecture_is_a_clear_error_or_explicit_partial_mode():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(litespark_hf.UnsupportedArchitectureError, match="litespark supports the model types .*llama.*starcoder2"):
        litespark_hf.apply(model)
    with pytest.warns(UserWarning, match="only the attention backend"):
        litespark_hf.apply(model, allow_partial=True)
    assert litespark_hf.swapped_counts(model) == {}


def test_unknown_litespark_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown litespark_config keys"):
        LitesparkConfig.from_any({"atention": False})


@pytest.mark.parametrize("value", ["maybe", "false", 1, None])
def test_a_switch_must_be_a_boolean(value):
    with pytest.raises(ValueError, match="'lean_bookkeeping' must be true or false"):
        LitesparkConfig.from_any({"lean_bookkeeping": value})
    assert LitesparkConfig.from_any('{"lean_bookkeeping": false, "unpad": true}').lean_bookkeeping is False


def test_switches_turn_parts_off():
    model = tiny_model("llama")
    litespark_hf.apply(model, mlp=False, fused_cross_entropy=False)
    counts = litespark_hf.swapped_counts(model)
    assert "gated_mlp" not in counts and "causal_lm" not in counts and counts["rms_norm"] == 5


def test_from_config_and_set_attn_implementation():
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2"), attn_implementation="litespark")
    assert model.config._attn_implementation == "litespark"
    other = tiny_model("qwen2", attn_implementation="sdpa")
    other.set_attn_implementation("litespark")
    assert other.config._attn_implementation == "litespark"


def test_from_pretrained_in_a_fresh_process(tmp_path):
    """Registration happens at import, in every process: a new interpreter loads a saved model with the backend."""
    tiny_model("mistral").save_pretrained(tmp_path)
    code = textwrap.dedent(f"""
        import torch, litespark_hf
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="litespark")
        assert m.config._attn_implementation == "litespark"
        out = m(input_ids=torch.randint(0, 128, (1, 12))).logits
        assert torch.isfinite(out).all()
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_peft_lora_model_trains_and_matches_stock():
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    stock = get_peft_model(tiny_model("llama", attn_implementation="sdpa"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    assert litespark_hf.swapped_counts(lit)["gated_mlp"] == 2
    ids = random_batch()
    losses = []
    for m in (stock, lit):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for (name, a), (_, b) in zip(stock.named_parameters(), lit.named_parameters()):
        if "lora_" in name:
            assert b.grad is not None and b.grad.abs().sum() > 0
            assert ((a.grad - b.grad).norm() / a.grad.norm()).item() < 1e-4, name
        else:
            assert b.grad is None  # frozen base weights


def test_flags_exist_on_all_argument_classes_and_parse_from_the_command_line():
    from trl import TrlParser

    for name in ("TrainingArguments", "SFTConfig", "DPOConfig"):
        cls = getattr(litespark_hf, name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert fields["use_litespark"].default is False and fields["use_litespark"].metadata["help"]
        assert "litespark_config" in fields
    parser = TrlParser((litespark_hf.SFTConfig,))
    (args,) = parser.parse_args_and_config(
        ["--output_dir", "/tmp/x", "--use_litespark", "--bf16", "false", "--use_cpu", "true",
         "--litespark_config", '{"mlp": false}'])
    assert args.use_litespark is True and LitesparkConfig.from_any(args.litespark_config).mlp is False
    with pytest.raises(ValueError, match="unknown litespark_config keys"):
        litespark_hf.SFTConfig(output_dir="/tmp/x", bf16=False, use_cpu=True, litespark_config='{"nope": 1}')


def test_trainer_flag_applies_before_gradient_checkpointing_and_prepare(tmp_path, monkeypatch):
    """The rewrite happens at the start of train(), before activation checkpointing and accelerator.prepare."""
    from datasets import Dataset

    events = []
    model = tiny_model("llama")
    original_enable = model.activation_checkpointing_enable

    def record_gc(*a, **k):
        events.append(("gc", litespark_hf.is_applied(model)))
        return original_enable(*a, **k)

    monkeypatch.setattr(model, "activation_checkpointing_enable", record_gc)
    ids = random_batch(batch=8, seq=16)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = litespark_hf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        use_litespark=True, activation_checkpointing=True, save_strategy="no", logging_steps=1)
    trainer = litespark_hf.Trainer(model=model, args=args, train_dataset=ds)
    original_prepare = trainer.accelerator.prepare

    def record_prepare(*a, **k):
        events.append(("prepare", litespark_hf.is_applied(model)))
        return original_prepare(*a, **k)

    monkeypatch.setattr(trainer.accelerator, "prepare", record_prepare)
    assert not litespark_hf.is_applied(model)
    trainer.train()
    assert ("gc", True) in events and ("prepare", True) in events
    assert litespark_hf.swapped_counts(model)["causal_lm"] == 1


@pytest.mark.parametrize("family", ["llama", "starcoder2"])
def test_trl_sft_trainer_trains_a_tiny_model_with_the_flag(tmp_path, family):
    from datasets import Dataset

    from litespark_hf import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 128, (4, 20), generator=g).repeat(4, 1)
    ds = Dataset.from_dict({"input_ids": rows.tolist()})  # pre-tokenised language-modelling data
    model = tiny_model(family)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                     bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                     use_litespark=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tokenizer())
    trainer.train()
    counts = litespark_hf.swapped_counts(trainer.model)
    attention = counts.get("attention", 0) + counts.get("attention_config_window", 0)
    assert attention == 2 and ("rms_norm" in counts or "layer_norm" in counts)
    assert "causal_lm" not in counts  # TRL keeps its own fused LM head
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 10 and losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_window_source_follows_the_family(family):
    """A `sliding_window` value on the config applies only where the stock family reads it there
    (Llama ignores it; Mistral/StarCoder2 read the config; Qwen2/Qwen3 their per-layer setting)."""
    stock = tiny_model(family, attn_implementation="sdpa", sliding_window=5)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    ids = random_batch(batch=2, seq=20)
    stock.eval(), lit.eval()
    with torch.no_grad():
        a, b = stock(input_ids=ids, use_cache=False).logits, lit(input_ids=ids, use_cache=False).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_dtensor_inputs_fall_back_to_the_reference(tmp_path):
    """A still-sharded FSDP2 parameter (a DTensor) never reaches a Triton kernel (raw pointers): the reference runs."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from litespark_kernels._dispatch import use_triton

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.randn(8), mesh, [Replicate()])
        with pytest.warns(UserWarning, match="DTensor"):
            assert use_triton("rms_norm_dtensor_check", torch.randn(2, 8), w) is False
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_trainer_folds_grad_clipping_into_the_fused_optimizer(tmp_path, optim):
    """With a fused torch AdamW the clip factor goes to the optimizer as grad_scale (no separate pass over the
    gradients): the logged gradient norms and the trained weights match the Trainer's own clipping; with the
    non-fused AdamW (or fused_grad_clip off) the Trainer clips as usual."""
    import json

    from datasets import Dataset

    ids = random_batch(batch=8, seq=16)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    runs = []
    for fold in (True, False):
        model = tiny_model("llama")
        args = litespark_hf.TrainingArguments(
            output_dir=str(tmp_path / str(fold)), max_steps=4, per_device_train_batch_size=4, report_to=[],
            use_cpu=True, use_litespark=True, litespark_config=json.dumps({"fused_grad_clip": fold}),
            max_grad_norm=0.05, learning_rate=1e-2, optim=optim, save_strategy="no", logging_steps=1)
        trainer = litespark_hf.Trainer(model=model, args=args, train_dataset=ds)
        original = trainer._litespark_folded_clip
        folded = []

        def spy(m, _orig=original):
            r = _orig(m)
            folded.append(r is not None)
            return r

        trainer._litespark_folded_clip = spy
        trainer.train()
        norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        runs.append((norms, {n: p.detach().clone() for n, p in model.named_parameters()}, folded))
    (n1, p1, f1), (n2, p2, f2) = runs
    assert f1 == [optim == "adamw_torch_fused"] * 4 and f2 == [False] * 4
    assert len(n1) == 4 and all(n > 0.05 for n in n1)  # the clip was active on every step
    for a, b in zip(n1, n2):
        assert abs(a - b) <= 1e-5 * b
    for name, p in p1.items():
        torch.testing.assert_close(p, p2[name], rtol=1e-5, atol=1e-6)


def test_trainer_nan_filter_runs_on_the_gpu_side_with_the_same_logs(tmp_path):
    """logging_nan_inf_filter done with torch.where in training_step (no host sync per step): the logged losses
    equal the Trainer's own filter's, a NaN step is replaced by the running average, and the flag is put back."""
    import json
    import math

    from datasets import Dataset

    ids = random_batch(batch=8, seq=16)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    logs, used = [], []
    for own, nan_filter in ((True, True), (False, True), (True, False)):
        model = tiny_model("llama")
        args = litespark_hf.TrainingArguments(
            output_dir=str(tmp_path / f"{own}{nan_filter}"), max_steps=4, per_device_train_batch_size=2, report_to=[],
            use_cpu=True, use_litespark=True, litespark_config=json.dumps({"sync_free_nan_filter": own}),
            logging_nan_inf_filter=nan_filter, save_strategy="no", logging_steps=2)
        trainer = litespark_hf.Trainer(model=model, args=args, train_dataset=ds)
        compute_loss = trainer.compute_loss

        def nan_on_step_two(*a, _orig=compute_loss, _t=trainer, **k):
            loss = _orig(*a, **k)
            used.append(_t.__dict__.get("_litespark_nan_filter", False))
            # NaN value on the second step, gradients unchanged (a constant is added)
            return loss + float("nan") if _t.state.global_step == 1 else loss

        trainer.compute_loss = nan_on_step_two
        trainer.train()
        assert trainer.args.logging_nan_inf_filter is nan_filter
        logs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert used[:4] == [True] * 4 and used[4:8] == [False] * 4 and used[8:] == [False] * 4
    (a, b, raw) = logs
    assert len(a) == 2 and all(math.isfinite(x) for x in a)
    assert a == pytest.approx(b, rel=1e-6)
    assert math.isnan(raw[0])  # no filter asked for: the NaN is logged


@pytest.mark.parametrize("family", ["llama", "granite", "mixtral"])
def test_save_pretrained_names_the_stock_class(tmp_path, family):
    """A Litespark model saves what the stock one would: config.architectures names the stock class (transformers
    writes type(self).__name__, which is Litespark<Name> for the swapped class), and it loads back as stock."""
    import json

    model = tiny_model(family)
    stock_name = type(model).__name__
    litespark_hf.apply(model)
    assert type(model).__name__ != stock_name
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [stock_name]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == stock_name
    for (n, p), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, p2), n
