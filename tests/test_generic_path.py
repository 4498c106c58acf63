"""The generic path (litespark_hf/generic.py): decoder-only causal LMs outside the architecture table, float32 on CPU.

Three real transformers model types of different structures, none in the table:
- arcee: Llama's norms, attention and pre-norm decoder layer, but a non-gated ReLU^2 MLP (up/down only): norms,
  attention and decoder layers swapped, the MLP left stock;
- helium: Llama-like with the weight applied before the rounding in its RMSNorm (the weight-first convention) and an
  interleaved RoPE: norms and gated MLP swapped; the attention fails its check (RoPE layout), the decoder layer is
  left stock (its post-attention norm has no fused add);
- cohere: a mean-subtracting LayerNorm, parallel attention + MLP decoder layer, interleaved RoPE, logit scale: only
  the gated MLP swapped (the LayerNorm and the attention fail their checks, the decoder layer is not recognised).

Criteria (as tests/test_equivalence.py): logits and every parameter gradient within relative error 1e-4 (plain,
right/left padded and packed batches), a few AdamW steps with equal losses; the warning lists what was swapped and
what was left stock; a module whose check fails (or whose stock forward passes a feature the Litespark module would
drop) is not swapped; restore undoes everything; the errors for models the generic path cannot take.
"""

import copy
import functools
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import litespark_hf
from litespark_hf import generic
from litespark_hf.modules import original_class
from test_equivalence import BATCHES, padded_batch, padded_labels, rel_err
from tiny_models import alternating_padded_batches, assert_matches_stock, train_side_by_side

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "arcee": dict(),
    "helium": dict(),
    "cohere": dict(logit_scale=0.5),
}
EXPECTED_SWAPS = {
    "arcee": {"rms_norm": 5, "attention_layer_window": 2, "decoder_layer": 2},
    "helium": {"olmo_rms_norm": 5, "gated_mlp": 2},
    "cohere": {"gated_mlp": 2},
}
EXPECTED_LEFT = {
    "arcee": ["ArceeMLP", "ArceeForCausalLM"],
    "helium": ["HeliumAttention", "HeliumDecoderLayer", "HeliumForCausalLM"],
    "cohere": ["CohereLayerNorm", "CohereAttention", "CohereDecoderLayer", "CohereForCausalLM"],
}


def tiny(model_type, seed=0, **overrides):
    config = AutoConfig.for_model(model_type, **{**COMMON, **MODELS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    with torch.no_grad():  # norm weights away from their init of ones, so that their convention matters
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def make_pair(model_type, **overrides):
    stock = tiny(model_type, **overrides)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return stock, lit


@pytest.mark.parametrize("model_type", list(MODELS))
def test_swaps_warning_and_restore(model_type):
    model = tiny(model_type)
    before = dict(model.named_parameters())
    generic._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        litespark_hf.apply(model)
    messages = [str(w.message) for w in caught if "generic path" in str(w.message)]
    assert len(messages) == 1
    assert litespark_hf.swapped_counts(model) == EXPECTED_SWAPS[model_type]
    assert model.config._attn_implementation == "litespark"
    assert all(p is before[n] for n, p in model.named_parameters())  # nothing copied
    report = model.__dict__["_litespark_state"]["generic"]
    assert sorted(report["left_stock"]) == sorted(EXPECTED_LEFT[model_type])
    left_part = messages[0].split("Left stock:")[1]
    for name in EXPECTED_LEFT[model_type]:
        assert name in left_part
    for name in report["swapped"]:
        assert name in messages[0].split("Left stock:")[0]
    with warnings.catch_warnings(record=True) as caught:  # applying again: nothing changes, no second warning
        warnings.simplefilter("always")
        litespark_hf.apply(model)
    assert not [w for w in caught if "generic path" in str(w.message)]
    assert litespark_hf.swapped_counts(model) == EXPECTED_SWAPS[model_type]
    litespark_hf.restore(model)
    assert not litespark_hf.is_applied(model)
    assert model.config._attn_implementation == "sdpa"
    assert all(original_class(m) is None for m in model.modules())


@pytest.mark.parametrize("batch_kind", list(BATCHES))
@pytest.mark.parametrize("model_type", list(MODELS))
def test_logits_and_gradients_match_stock(model_type, batch_kind):
    stock, lit = make_pair(model_type)
    assert_matches_stock(stock, lit, *BATCHES[batch_kind]())


@pytest.mark.parametrize("model_type", list(MODELS))
def test_training_steps_match_stock(model_type):
    stock, lit = make_pair(model_type)
    history = train_side_by_side((stock, lit), alternating_padded_batches(padded_batch()[0]["attention_mask"],
                                                                          padded_labels), steps=6)
    for step, (a, b) in enumerate(history):
        assert abs(a - b) <= 1e-4 * a, (step, a, b)
    assert history[-1][0] < history[0][0]


def test_a_module_whose_check_fails_is_not_swapped(monkeypatch):
    """ArceeRMSNorm made to differ from every norm convention: left stock (and listed), and with it the decoder
    layers (their post-attention norm has no fused add); the model still equals stock."""
    from transformers.models.arcee import modeling_arcee

    real = modeling_arcee.ArceeRMSNorm.forward
    monkeypatch.setattr(modeling_arcee.ArceeRMSNorm, "forward", lambda self, x: real(self, x) * 1.001)
    stock, lit = make_pair("arcee")
    report = lit.__dict__["_litespark_state"]["generic"]
    assert report["left_stock"]["ArceeRMSNorm"].startswith("check failed")
    assert "ArceeDecoderLayer" in report["left_stock"]
    assert litespark_hf.swapped_counts(lit) == {"attention_layer_window": 2}
    assert all(original_class(m) is None for m in lit.modules() if isinstance(m, modeling_arcee.ArceeRMSNorm))
    inputs, valid = padded_batch()
    with torch.no_grad():
        a = stock(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        b = lit(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert rel_err(b[valid], a[valid]) <= 1e-4


def test_a_feature_the_swap_would_drop_fails_the_check(monkeypatch):
    """An attention whose stock forward passes a soft-cap to its attention function (Gemma2-style): the Litespark
    attention would not pass it, so the class stays stock (and the backend gets the soft-cap from the stock
    module)."""
    from transformers.models.arcee import modeling_arcee

    real = modeling_arcee.ArceeAttention.forward

    @functools.wraps(real)
    def forward(self, *args, **kwargs):
        return real(self, *args, **{**kwargs, "softcap": 5.0})

    monkeypatch.setattr(modeling_arcee.ArceeAttention, "forward", forward)
    model = tiny("arcee")
    litespark_hf.apply(model)
    why = model.__dict__["_litespark_state"]["generic"]["left_stock"]["ArceeAttention"]
    assert "softcap" in why
    assert "attention_layer_window" not in litespark_hf.swapped_counts(model)


def test_switches_are_honoured():
    model = tiny("arcee")
    litespark_hf.apply(model, rope=False)
    assert litespark_hf.swapped_counts(model) == {"rms_norm": 5, "decoder_layer": 2}
    assert "switched off" in model.__dict__["_litespark_state"]["generic"]["left_stock"]["ArceeAttention"]


def test_allow_partial_keeps_its_meaning():
    model = tiny("arcee")
    with pytest.warns(UserWarning, match="only the attention backend"):
        litespark_hf.apply(model, allow_partial=True)
    assert litespark_hf.swapped_counts(model) == {}
    assert model.config._attn_implementation == "litespark"


def test_models_the_generic_path_cannot_take_are_one_line_errors():
    with pytest.raises(litespark_hf.UnsupportedArchitectureError, match="generic=False") as err:
        litespark_hf.apply(tiny("arcee"), generic=False)
    assert "\n" not in str(err.value)
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(litespark_hf.UnsupportedArchitectureError, match="found no module it can swap") as err:
        litespark_hf.apply(gpt2)
    assert "\n" not in str(err.value) and "allow_partial=True" in str(err.value)
    assert not litespark_hf.is_applied(gpt2) and gpt2.config._attn_implementation != "litespark"
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(litespark_hf.UnsupportedArchitectureError, match="encoder-decoder"):
        litespark_hf.apply(t5)


def test_the_check_leaves_the_random_state_and_the_model_alone():
    model = tiny("arcee")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    litespark_hf.apply(model)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
