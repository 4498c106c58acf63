"""Pre-train a causal LM from scratch (Llama architecture by default; StarCoder2, Mistral, Qwen2/3 by config), or
continue pre-training an existing one (``--model_name_or_path``).

Runs on TRL's SFTTrainer language-modelling path (a plain ``text`` dataset): documents are tokenized, long ones
split into ``max_length`` pieces and packed best-fit (``packing_strategy: bfd_split``) into padding-free rows whose
``position_ids`` restart at every document, so no token attends across a document boundary.

    python recipes/pretrain.py                                  # embedded default: stdlib corpus, tiny Llama
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/pretrain.py \
        --config recipes/configs/pretrain_llama_1b.yaml --use_litespark
    python recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml --max_steps 50 --output_dir out/p
    python recipes/pretrain.py --model_name_or_path out/p --output_dir out/cpt \
        --use_litespark --sat_omission_rate_mlp 0.5 --sat_omission_rate_heads 0.5     # continual, with SAT

Continual pre-training: ``--model_name_or_path`` (a directory or Hub name; a PEFT adapter directory is merged into its
base) loads that model and, unless ``--tokenizer_name_or_path`` is given, its tokenizer; the architecture and shape
flags (``--model_type``, ``--hidden_size``, ... ``--model_config_overrides``) are then ignored (the log says which
were set). The data, packing and evaluation are the same as from scratch.

Datasets: ``--dataset_name`` = a Hub name, local files (.jsonl/.json/.parquet/.txt/.csv, a directory or a glob), or
unset for the embedded default. Tokenizer: ``--tokenizer_name_or_path``, or unset for the embedded one (from scratch) /
the model's own (continual pre-training).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import RecipeError  # noqa: E402

RECIPE = "pretrain"


_IGNORED = " Ignored with --model_name_or_path (continual pre-training keeps the model's architecture)."


@dataclass
class PretrainArguments(common.DataArguments):
    model_type: str = field(default="llama", metadata={"help": "Architecture: llama, starcoder2, mistral, qwen2, "
                                                               "qwen3." + _IGNORED})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Any HF tokenizer, or 'embedded'; unset = the embedded one from scratch, the model's own with "
                "--model_name_or_path."})
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the embedded tokenizer."})
    hidden_size: int = field(default=128, metadata={"help": "Model width." + _IGNORED})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of layers." + _IGNORED})
    num_attention_heads: int = field(default=4, metadata={"help": "Query heads." + _IGNORED})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (GQA)." + _IGNORED})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width." + _IGNORED})
    vocab_size: int | None = field(default=None, metadata={"help": "Model vocabulary; unset = the tokenizer's."
                                                                   + _IGNORED})
    max_position_embeddings: int = field(default=4096, metadata={"help": "Longest position the model supports."
                                                                         + _IGNORED})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share input and output embeddings."
                                                                      + _IGNORED})
    model_config_overrides: str | None = field(default=None, metadata={"help": "Other config fields as JSON."
                                                                               + _IGNORED})
    corpus_max_train_chars: int | None = field(default=None, metadata={"help": "Embedded corpus: train characters "
                                                                                "(unset = all)."})
    corpus_max_eval_chars: int | None = field(default=300_000, metadata={"help": "Embedded corpus: held-out chars."})
    corpus_heldout_percent: float = field(default=2.0, metadata={"help": "Embedded corpus: held-out files, %."})


def defaults() -> dict:
    return common.common_training_defaults("outputs/pretrain") | dict(
        max_steps=400, per_device_train_batch_size=4, per_device_eval_batch_size=16, learning_rate=2e-3,
        weight_decay=0.1, max_length=256, packing=True, packing_strategy="bfd_split", eval_on_start=True,
        dataset_text_field="text",
    )


ARCHITECTURE_FLAGS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                      "model_config_overrides")


def ignored_architecture_flags(script_args) -> list[str]:
    """The architecture / shape flags set to something other than their default (ignored when continuing)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainArguments)}
    return [f"{k}={getattr(script_args, k)}" for k in ARCHITECTURE_FLAGS if getattr(script_args, k) != defaults[k]]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_existing(path: str, script_args, model_args):
    """``(model, tokenizer)`` for continual pre-training: the model at ``path`` and its tokenizer (or the one given)."""
    tok_path = script_args.tokenizer_name_or_path
    if not tok_path and os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise RecipeError(f"model directory '{path}' holds no tokenizer; give --tokenizer_name_or_path (the "
                          "tokenizer the model was trained with, or 'embedded' for the embedded one)")
    model = common.load_pretrained(path, model_args.dtype, model_args.attn_implementation)
    if common.is_embedded(tok_path) and tok_path is not None:  # explicitly 'embedded'
        tokenizer = common.load_tokenizer(None, script_args.tokenizer_vocab_size)
    else:
        tokenizer = common.load_tokenizer(tok_path or path)
    n_emb = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_emb:
        raise RecipeError(f"tokenizer has {len(tokenizer)} tokens but model '{path}' only {n_emb} embeddings; give "
                          "the model's tokenizer (unset --tokenizer_name_or_path)")
    return model, tokenizer


def shape(script_args) -> dict:
    out = {k: getattr(script_args, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "intermediate_size", "vocab_size",
                                                "max_position_embeddings", "tie_word_embeddings")}
    if script_args.model_config_overrides:
        try:
            extra = json.loads(script_args.model_config_overrides) if isinstance(
                script_args.model_config_overrides, str) else dict(script_args.model_config_overrides)
        except json.JSONDecodeError as e:
            raise RecipeError(f"model_config_overrides must be a JSON object: {e}") from e
        out.update(extra)
    return out


def make_trainer_class():
    """SFTTrainer that also logs held-out perplexity (built here so that TRL is imported lazily)."""
    from litespark_hf import SFTTrainer

    class _PretrainTrainer(SFTTrainer):
        def evaluate(self, *args, **kwargs):
            metrics = super().evaluate(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            if f"{prefix}_loss" in metrics:
                metrics[f"{prefix}_perplexity"] = common.perplexity(metrics[f"{prefix}_loss"])
                self.log({f"{prefix}_perplexity": metrics[f"{prefix}_perplexity"]})
            return metrics

    return _PretrainTrainer


def main(argv=None) -> dict:
    from trl import ModelConfig

    from litespark_hf import SFTConfig
    from litespark_hf.data import load_corpus

    script_args, training_args, model_args, options = common.parse_args(
        (PretrainArguments, SFTConfig, ModelConfig), argv,
        defaults())
    # Validate everything before anything is written.
    common.check_model_type(script_args.model_type)
    start = model_args.model_name_or_path  # set: continual pre-training of that model
    if not start:  # from scratch: the shape must be valid JSON before anything is loaded
        shape(script_args)
    resume, fp, clear = common.check_run(RECIPE, script_args, training_args, model_args)

    if start:
        model, tokenizer = load_existing(start, script_args, model_args)
    else:
        tokenizer = common.load_tokenizer(script_args.tokenizer_name_or_path, script_args.tokenizer_vocab_size)
    text_field = training_args.dataset_text_field

    def embedded():
        with common.main_process_first():
            return load_corpus(script_args.corpus_heldout_percent, script_args.corpus_max_train_chars,
                               script_args.corpus_max_eval_chars)

    train_ds, eval_ds, source = common.load_any_dataset(script_args, embedded, training_args.seed, text_field)
    common.check_columns(train_ds, [(text_field,)], RECIPE,
                         hint="pre-training reads plain text: set dataset_text_field to the text column")
    if not start:
        model = common.build_model(script_args.model_type, tokenizer, shape(script_args), model_args.dtype,
                                   model_args.attn_implementation, seed=training_args.seed)
    if eval_ds is None or training_args.eval_strategy == "no":
        training_args.eval_strategy, training_args.eval_on_start, eval_ds = "no", False, None

    common.prepare_output_dir(training_args.output_dir, RECIPE, fp, clear, argv)
    n_params = sum(p.numel() for p in model.parameters())
    trainer = make_trainer_class()(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
    )
    common.attach_callbacks(trainer, options)
    model_type = model.config.model_type
    if start:
        ignored = ignored_architecture_flags(script_args)
        trainer.accelerator.print(
            f"[pretrain] continual pre-training of {start}: {model_type} model, {n_params / 1e6:.2f}M parameters, "
            f"vocab {model.config.vocab_size}, tokenizer: {script_args.tokenizer_name_or_path or start}, data: {source}"
            + (f"; ignored architecture flags: {', '.join(ignored)}" if ignored else
               "; architecture/shape flags are ignored (the model's own are kept)"))
    else:
        trainer.accelerator.print(f"[pretrain] {model_type} model, {n_params / 1e6:.2f}M parameters, "
                                  f"vocab {model.config.vocab_size}, data: {source}")
    train_out = trainer.train(resume_from_checkpoint=resume)

    results = {"params_M": n_params / 1e6, "train_loss": train_out.training_loss,
               "steps": trainer.state.global_step, "start": start or "from scratch"}
    if eval_ds is not None:
        first = next((h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h), None)
        final = trainer.evaluate()["eval_loss"]
        results |= {"heldout_loss_before": first, "heldout_loss_after": final,
                    "heldout_ppl_before": common.perplexity(first), "heldout_ppl_after": common.perplexity(final)}
        trainer.accelerator.print(f"[pretrain] held-out loss {first:.3f} -> {final:.3f} "
                                  f"(perplexity {results['heldout_ppl_before']:.1f} -> "
                                  f"{results['heldout_ppl_after']:.1f})")
    common.save_all(trainer, tokenizer, training_args.output_dir, RECIPE, source, results,
                    tags=[model_type] + (["continual-pretraining"] if start else []))
    return results


if __name__ == "__main__":
    common.run_main(main)
