"""Tokenizer and model loading: the embedded or any HF tokenizer, a fresh model sized by flags (checked before
anything is loaded), a pre-trained model from a directory or the Hub, and the starting point of sft.py / dpo.py."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

import torch

from .data import hub_offline, is_embedded, looks_local
from .errors import RecipeError

TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, max_position_embeddings=4096, tie_word_embeddings=True)


def main_process_first():
    from accelerate import PartialState

    return PartialState().main_process_first()


def min_embedded_vocab() -> int:
    from litespark_hf.data.tokenizer import SPECIAL_TOKENS

    return 256 + len(SPECIAL_TOKENS) + 1  # bytes + special tokens + at least one merge


def check_vocab_size(vocab_size: int) -> None:
    """The embedded byte-level BPE needs every byte and its special tokens."""
    low = min_embedded_vocab()
    if vocab_size is None or vocab_size < low:
        raise RecipeError(f"--tokenizer_vocab_size {vocab_size}: the embedded byte-level tokenizer needs at least "
                          f"{low} tokens (256 bytes + special tokens + merges); 2048 is the default")


def _missing_path_error(what: str, path: str) -> RecipeError | None:
    """The message for a model / tokenizer path that is not a local directory, or None when it may be a Hub id."""
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        return RecipeError(f"{what} path {path} is a file; give the directory that holds config.json and the weights")
    if os.path.isdir(expanded):
        return None
    if looks_local(path):
        return RecipeError(f"{what} path {path} does not exist (no such directory); give an existing model directory "
                           "or a Hub repo id")
    if hub_offline():
        return RecipeError(f"{what} '{path}' is not a local directory (no such path), and offline (HF_HUB_OFFLINE=1) "
                           "a Hub repo id only loads from the local cache, where it is not; give an existing "
                           "directory, or run online (HF_HUB_OFFLINE=0) to download it")
    return None


def load_tokenizer(name_or_path: str | None, vocab_size: int | None = None):
    """The tokenizer at ``name_or_path`` (any HF tokenizer), or the embedded one when unset / 'embedded'."""
    from transformers import AutoTokenizer

    from litespark_hf.data import DEFAULT_VOCAB_SIZE, load_embedded_tokenizer

    if is_embedded(name_or_path):
        check_vocab_size(vocab_size or DEFAULT_VOCAB_SIZE)
        with main_process_first():
            return load_embedded_tokenizer(vocab_size or DEFAULT_VOCAB_SIZE)
    error = _missing_path_error("tokenizer", name_or_path)
    if error is not None:
        raise error
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    except Exception as e:  # noqa: BLE001
        extra = " (offline: HF_HUB_OFFLINE=1; give a local directory)" if hub_offline() else ""
        raise RecipeError(f"cannot load tokenizer '{name_or_path}'{extra}: {' '.join(str(e).split())[:300]}; unset "
                          "tokenizer_name_or_path for the embedded tokenizer") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def supported_model_types() -> list[str]:
    from litespark_hf import SUPPORTED_MODEL_TYPES

    return sorted(SUPPORTED_MODEL_TYPES)


def check_model_type(model_type: str):
    types = supported_model_types()
    if model_type not in types:
        close = difflib.get_close_matches(model_type, types, n=1)
        raise RecipeError(f"unknown model_type '{model_type}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                          + f"; choose one of {types}")


def _config(model_type: str, vocab: int, shape: dict, **ids):
    """The transformers config, with its own validation (head counts, ...) as one RecipeError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, vocab_size=vocab, **ids, **shape)
    except Exception as e:  # noqa: BLE001 - StrictDataclassClassValidationError, ValueError, TypeError
        cause = e.__cause__ if e.__cause__ is not None else e
        raise RecipeError(f"the {model_type} model shape {shape} is invalid: {' '.join(str(cause).split())}") from e


def check_shape(model_type: str, shape: dict, max_length: int | None = None) -> None:
    """Everything about a fresh model's shape that can be checked before the tokenizer and data are loaded."""
    check_model_type(model_type)
    shape = {k: v for k, v in shape.items() if v is not None}
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "max_position_embeddings", "vocab_size"):
        if k in shape and (not isinstance(shape[k], int) or shape[k] < 1):
            raise RecipeError(f"--{k} {shape[k]}: must be a positive integer")
    heads, kv = shape.get("num_attention_heads"), shape.get("num_key_value_heads")
    if heads and shape.get("hidden_size") and shape["hidden_size"] % heads and "head_dim" not in shape:
        raise RecipeError(f"--num_attention_heads {heads} does not divide --hidden_size {shape['hidden_size']}; "
                          f"choose a divisor (e.g. {_divisor_near(shape['hidden_size'], heads)})")
    if heads and kv and heads % kv:
        raise RecipeError(f"--num_key_value_heads {kv} does not divide --num_attention_heads {heads} (each key/value "
                          "head serves a whole group of query heads); choose a divisor")
    if max_length and shape.get("max_position_embeddings") and max_length > shape["max_position_embeddings"]:
        raise RecipeError(f"--max_length {max_length} exceeds --max_position_embeddings "
                          f"{shape['max_position_embeddings']}; lower max_length or raise max_position_embeddings")
    _config(model_type, shape.pop("vocab_size", None) or 1024, shape, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)  # the tokenizer's ids are set later


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def build_model(model_type: str, tokenizer, shape: dict, dtype=None, attn_implementation: str | None = None,
                seed: int = 42):
    """A randomly initialised causal LM of ``model_type`` sized by ``shape`` (config keys), vocabulary sized to the
    tokenizer unless ``shape['vocab_size']`` is given (a larger one is fine: it is rounded for the tokenizer).
    The initialisation is seeded by ``seed``, so every process and every launch (1 or N processes) starts from the
    same weights."""
    from transformers import AutoModelForCausalLM, set_seed

    check_model_type(model_type)
    shape = {k: v for k, v in shape.items() if v is not None}
    vocab = shape.pop("vocab_size", None) or len(tokenizer)
    if vocab < len(tokenizer):
        raise RecipeError(f"vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens; raise it or "
                          "unset it (the tokenizer's size is used)")
    cfg = _config(model_type, vocab, shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        cfg.dtype = dtype
    # use_cache=False: with a cache object the model ignores packed position_ids (cross-document attention).
    cfg.use_cache = False
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    set_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype if dtype not in (None, "auto") else None, **kwargs)
    except (ImportError, ValueError) as e:  # e.g. an attention implementation that is not installed
        raise RecipeError(_attn_hint(attn_implementation, e)) from e


def _attn_hint(attn_implementation, e: Exception) -> str:
    text = " ".join(str(e).split())[:300].rstrip(".")
    if attn_implementation:
        return (f"--attn_implementation {attn_implementation}: {text}; use sdpa or eager (with Litespark on, its own "
                "attention backend replaces it)")
    return f"cannot build the model: {text}"


def has_model(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "adapter_config.json")))


def check_model_path(path: str) -> None:
    """A model path that is not a model: one message (before anything is loaded)."""
    error = _missing_path_error("model", path)
    if error is not None:
        raise error
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded) and not has_model(expanded):
        raise RecipeError(f"model directory {path} holds no model (no config.json or adapter_config.json); give the "
                          "directory a recipe or save_pretrained wrote")


def load_pretrained(path: str, dtype=None, attn_implementation: str | None = None):
    """A causal LM from a directory or Hub name; a PEFT adapter directory is merged into its base model."""
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    path = os.path.expanduser(path)
    kwargs = {}
    if dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as e:
        raise RecipeError(_attn_hint(attn_implementation, e)) from e
    except Exception as e:  # noqa: BLE001
        extra = " (offline: HF_HUB_OFFLINE=1; give a local directory)" if hub_offline() else ""
        raise RecipeError(f"cannot load model '{path}'{extra}: {' '.join(str(e).split())[:300]}") from e
    model.config.use_cache = False  # training: a cache object would make the model ignore packed position_ids
    return model


@dataclass
class Start:
    """Where sft.py / dpo.py start: ``path`` (a directory or Hub id) or None for a fresh tiny model."""

    path: str | None
    description: str


def load_start(model_name_or_path: str | None, fallbacks: list[str], tokenizer_name_or_path: str | None,
               vocab_size: int, dtype=None, attn_implementation=None):
    """``(model, tokenizer, Start)``: the given model, else the first fallback directory holding a model
    (the previous recipe's default output), else a fresh tiny Llama on the embedded tokenizer."""
    path = model_name_or_path or next((p for p in fallbacks if has_model(p)), None)
    if path:
        model = load_pretrained(path, dtype, attn_implementation)
        tok_path = tokenizer_name_or_path or path
        tokenizer = load_tokenizer(tok_path) if not is_embedded(tok_path) else load_tokenizer(None, vocab_size)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise RecipeError(f"tokenizer has {len(tokenizer)} tokens but model {path} only "
                              f"{model.get_input_embeddings().num_embeddings} embeddings; give the model's tokenizer")
        return model, tokenizer, Start(path, path)
    tokenizer = load_tokenizer(tokenizer_name_or_path, vocab_size)
    model = build_model("llama", tokenizer, TINY_SHAPE, dtype, attn_implementation)
    return model, tokenizer, Start(None, "fresh tiny llama (no pre-trained model found)")


def check_lora_targets(model, model_args) -> None:
    """``--lora_target_modules`` that match no module of the model: one message listing the model's linear layers
    (peft would raise deep inside the trainer's constructor)."""
    targets = getattr(model_args, "lora_target_modules", None)
    if not getattr(model_args, "use_peft", False) or targets in (None, "all-linear", ["all-linear"]):
        return
    if isinstance(targets, str):
        targets = [targets]
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise RecipeError(f"--lora_target_modules {' '.join(missing)} match{'es' if len(missing) == 1 else ''} no "
                          f"module of the model; its linear layers are {', '.join(linear)} (or give all-linear)")
