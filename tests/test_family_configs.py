"""The `litespark-train-bench` configs of the families beyond Llama/StarCoder2 (litespark_hf/efficiency/family_configs.py):
each builds (on the meta device: no memory, no weights) with the parameter count its note states, has the bench's
keys and the family's quirks on; and the bench records whether Liger actually patched a model (``liger_applied``)."""

import re
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from litespark_hf.efficiency import bench
from litespark_hf.efficiency.family_configs import FAMILY_CONFIGS
from litespark_hf.efficiency.flops import num_parameters

DENSE = {"gemma2", "gemma3_text", "phi3", "smollm3", "olmo2", "olmo3", "granite", "ministral"}


def _meta_model(cfg):
    config = AutoConfig.for_model(cfg["family"], **cfg["model"])
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


def test_one_config_per_family_and_merged_into_the_bench():
    families = [cfg["family"] for cfg in FAMILY_CONFIGS.values()]
    assert DENSE | {"mixtral", "qwen3_moe"} == set(families) and len(families) == len(set(families))
    for name, cfg in FAMILY_CONFIGS.items():
        assert bench.CONFIGS[name] is cfg
        assert {"family", "seq", "batch", "gradient_checkpointing", "model", "note"} <= set(cfg)
        assert cfg["seq"] == 2048 and cfg["batch"] >= 1 and isinstance(cfg["gradient_checkpointing"], bool)


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_config_builds_on_meta_with_the_noted_parameter_count(name):
    cfg = FAMILY_CONFIGS[name]
    config, model = _meta_model(cfg)
    assert config.model_type == cfg["family"]
    n = num_parameters(model)
    noted = float(re.search(r"([\d,]+\.\d)M params", cfg["note"]).group(1).replace(",", ""))
    assert abs(n / 1e6 - noted) <= 0.05, (n, noted)
    assert 0.9e9 <= n <= 3.0e9  # ~1B dense, 1-3B total for the MoE shapes


def test_the_family_quirks_are_on():
    built = {cfg["family"]: AutoConfig.for_model(cfg["family"], **cfg["model"]) for cfg in FAMILY_CONFIGS.values()}
    g2 = built["gemma2"]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (50.0, 30.0, 256)
    assert g2.sliding_window == 4096 and g2.layer_types[:2] == ["sliding_attention", "full_attention"]
    g3 = built["gemma3_text"]
    assert g3.sliding_window == 512 and g3.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert g3.vocab_size == 262144 and g3.hidden_size == 1152 and g3.num_hidden_layers == 26
    assert built["phi3"].rope_parameters["partial_rotary_factor"] == 0.75
    assert 0 in built["smollm3"].no_rope_layers and 1 in built["smollm3"].no_rope_layers
    gr = built["granite"]
    assert (gr.embedding_multiplier, gr.residual_multiplier, gr.attention_multiplier, gr.logits_scaling) == \
        (12.0, 0.22, 0.015625, 8.0)
    for family in ("olmo3", "ministral"):
        assert set(built[family].layer_types) == {"sliding_attention", "full_attention"}
    assert built["mixtral"].num_local_experts == 8 and built["mixtral"].num_experts_per_tok == 2
    assert built["qwen3_moe"].num_experts == 64 and built["qwen3_moe"].num_experts_per_tok == 8


def test_liger_applied_is_detected():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    assert bench._liger_applied(model) is False
    fake = types.ModuleType("liger_kernel.transformers.rms_norm")
    exec("def forward(self, x):\n    return x", fake.__dict__)
    model.model.norm.__dict__["forward"] = fake.forward.__get__(model.model.norm)  # Liger's instance patching
    assert bench._liger_applied(model) is True


def test_each_variant_result_records_liger_applied(tmp_path):
    result = bench.run_variant("tiny", "sdpa", steps=2, time_from=1, progress=False, out_dir=str(tmp_path))
    assert result["status"] == "ok" and result["liger_applied"] is False
