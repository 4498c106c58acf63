"""`litespark-train-bench` configs for the families beyond Llama/StarCoder2 (issue #16): one ~1B shape per family.

Each entry has the same keys as `bench.CONFIGS` (family = ``config.model_type``, seq, batch,
gradient_checkpointing, model = the `AutoConfig.for_model` keyword arguments, note). Every family's quirks are on,
at the values of its released checkpoints: real vocabulary sizes, Gemma's soft-caps / ``query_pre_attn_scalar`` /
sliding-full patterns, Phi-4-mini's partial rotary, SmolLM3's no-RoPE layers, OLMo's post-norms, Granite's
multipliers, Ministral's per-layer windows. Where the family has no ~1B checkpoint the width or depth is cut and the
note says from what. The parameter count in each note is the meta-device model's (``tests/test_family_configs.py``
checks it).

Memory (H200, 141 GB; fp32 master weights + AdamW = 16 bytes/parameter, bf16 autocast, no gradient checkpointing at
batch 4 x 2048): the ~1B models need ~17-24 GB for weights, gradients and optimizer state and ~10-30 GB of
activations. The large vocabularies dominate the stock variants: Gemma's 256k/262k-token logits for 8,192 tokens are
~4 GB in bf16, ~8 GB as the loss's fp32 upcast, and the soft-capped Gemma2 keeps a few such tensors for the
backward (~40 GB in all): estimated ~90 GB peak for stock sdpa at batch 4 (not measured yet), so batch 4 stays. The
``eager`` variant adds Gemma2's fp32 [4, 8, 2048, 2048] scores per layer (soft-capped: a few copies kept, ~2 GB per
layer, ~40 GB more) and may not fit; the bench records an out-of-memory variant and goes on.
"""

from __future__ import annotations

_SEQ, _BATCH = 2048, 4

FAMILY_CONFIGS: dict[str, dict] = {
    "gemma2-1b": dict(
        family="gemma2", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=256000, hidden_size=1536, intermediate_size=6144, num_hidden_layers=18,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4096, layer_types=["sliding_attention", "full_attention"] * 9,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0,
                   bos_token_id=2, eos_token_id=1),
        note="Gemma-2-2B quirks (attention soft-cap 50, final-logit soft-cap 30, query_pre_attn_scalar 256, sliding "
             "window 4096 on alternating layers: wider than seq 2048, so no token is masked by it), width 1536 and "
             "18 layers (2B: 2304 x 26) for ~1B (1,072.8M params), seq 2048, batch 4, no gradient checkpointing"),
    "gemma3-1b": dict(
        family="gemma3_text", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=512, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1),
        note="Gemma-3-1B shape (999.9M params; 5 sliding-window-512 layers to 1 global, RoPE 10k local / 1M global, "
             "(1 + w) q/k norms), seq 2048, batch 4, no gradient checkpointing"),
    "phi3-1b": dict(
        family="phi3", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=200064, hidden_size=2048, intermediate_size=6144, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True, resid_pdrop=0.0,
                   embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=199999, bos_token_id=199999,
                   eos_token_id=199999),
        note="Phi-4-mini-like (vocabulary 200,064, partial rotary 0.75, fused qkv_proj / gate_up_proj, tied "
             "embeddings) at width 2048 and 16 layers (Phi-4-mini: 3072 x 32) for ~1B (1,181.6M params), seq 2048, "
             "batch 4, no gradient checkpointing"),
    "smollm3-1b": dict(
        family="smollm3", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=12,
                   num_attention_heads=16, num_key_value_heads=4, no_rope_layers=[1, 1, 1, 0] * 3,
                   rope_parameters={"rope_type": "default", "rope_theta": 5000000.0}, max_position_embeddings=65536,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=128004, bos_token_id=128000,
                   eos_token_id=128001),
        note="SmolLM3-3B quirks (every 4th layer without RoPE, RoPE theta 5M, tied embeddings) at 12 layers "
             "(3B: 36) for ~1B (992.5M params), seq 2048, batch 4, no gradient checkpointing"),
    "olmo2-1b": dict(
        family="olmo2", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16,
                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, max_position_embeddings=4096,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=100277, bos_token_id=None,
                   eos_token_id=100257),
        note="OLMo-2-0425-1B shape (1,484.9M params; post-norms, q/k norms over the whole projection), seq 2048, "
             "batch 4, no gradient checkpointing"),
    "olmo3-1b": dict(
        family="olmo3", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=100278, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, sliding_window=4096,
                   layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 4, max_position_embeddings=65536,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=100277, bos_token_id=None,
                   eos_token_id=100257),
        note="OLMo-3 quirks (3 sliding-window-4096 layers to 1 full, wider than seq 2048; post-norms, whole-projection "
             "q/k norms; vocabulary 100,278) at the OLMo-2-1B shape (OLMo-3 starts at 7B) for ~1B (1,484.6M params), "
             "seq 2048, batch 4, no gradient checkpointing"),
    "granite-1b": dict(
        family="granite", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, embedding_multiplier=12.0,
                   residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000000.0}, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        note="Granite-3.x-2B multipliers (embedding 12, residual 0.22, attention 1/64, logits / 8; vocabulary 49,155) "
             "at 16 layers (2B: 40) for ~1B (1,073.8M params), seq 2048, batch 4, no gradient checkpointing"),
    "ministral-1b": dict(
        family="ministral", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=131072, hidden_size=2048, intermediate_size=6144, num_hidden_layers=12,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, sliding_window=32768,
                   layer_types=(["full_attention"] + ["sliding_attention"] * 3) * 3,
                   rope_parameters={"rope_type": "default", "rope_theta": 100000000.0}, max_position_embeddings=32768,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        note="Ministral-8B quirks (1 full to 3 sliding-window-32768 layers (layer_types), wider than seq 2048; RoPE "
             "theta 1e8; vocabulary 131,072, untied) at width 2048 and 12 layers (8B: 4096 x 36) for ~1B "
             "(1,140.9M params), seq 2048, batch 4, no gradient checkpointing"),
    # MoE (the grouped-GEMM experts of issue #16)
    "mixtral-moe": dict(
        family="mixtral", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=32000, hidden_size=1536, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=4, head_dim=128, num_local_experts=8,
                   num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                   max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                   bos_token_id=1, eos_token_id=2),
        note="Mixtral-shaped MoE (8 experts, top-2, SwiGLU experts; vocabulary 32,000, untied) at width 1536 and 12 "
             "layers (Mixtral-8x7B: 4096 x 32): 1,532.9M params total, seq 2048, batch 4, no gradient checkpointing"),
    "qwen3-moe": dict(
        family="qwen3_moe", seq=_SEQ, batch=_BATCH, gradient_checkpointing=False,
        model=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512,
                   num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                   num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                   mlp_only_layers=[], rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                   max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   bos_token_id=151643, eos_token_id=151645),
        note="Qwen3-MoE-shaped (64 experts, top-8, expert width 512, normalised top-k, q/k norms; vocabulary 151,936, "
             "tied) at width 1024 and 12 layers (Qwen3-30B-A3B: 2048 x 48, 128 experts): 1,427.3M params total, "
             "seq 2048, batch 4, no gradient checkpointing"),
}
