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

from recipe_utils import RecipeError  # noqa: E402
from recipe_utils.args import DataArguments, cpu_only, parse_args, require, require_min, training_defaults  # noqa: E402
from recipe_utils.card import install_model_card, save_all  # noqa: E402
from recipe_utils.data import check_columns, is_embedded, load_any_dataset  # noqa: E402
from recipe_utils.evaluation import perplexity  # noqa: E402
from recipe_utils.models import (build_model, check_model_path, check_shape, check_vocab_size,  # noqa: E402
                                 load_pretrained, load_tokenizer, main_process_first)
from recipe_utils.output_dir import OutputDir, plan_run  # noqa: E402
from recipe_utils.run import attach_callbacks, run_main  # noqa: E402

RECIPE = "pretrain"


_IGNORED = " Ignored with --model_name_or_path (continual pre-training keeps the model's architecture)."


@dataclass
class PretrainArguments(DataArguments):
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
    corpus_max_eval_chars: int | None = field(default=300_000, metadata={"help": "Embedded corpus: held-out "
                                                                               "characters (unset = all)."})
    corpus_heldout_percent: float = field(default=2.0, metadata={"help": "Embedded corpus: held-out files, in "
                                                                         "percent."})


# Without CUDA the defaults are sized to finish in a few minutes on a laptop CPU (300 steps; the embedded corpus cut
# to what 300 steps read, a small held-out set: the held-out loss still falls from ~7.7 to ~5); with CUDA they keep
# the full size. A YAML config or the command line overrides both.
GPU_DEFAULTS = dict(max_steps=400, corpus_max_train_chars=None, corpus_max_eval_chars=300_000)
CPU_DEFAULTS = dict(max_steps=300, corpus_max_train_chars=1_500_000, corpus_max_eval_chars=40_000)


def defaults() -> dict:
    return training_defaults("outputs/pretrain") | dict(
        per_device_train_batch_size=4, per_device_eval_batch_size=16, learning_rate=2e-3,
        weight_decay=0.1, max_length=256, packing=True, packing_strategy="bfd_split", eval_on_start=True,
        dataset_text_field="text",
    ) | (CPU_DEFAULTS if cpu_only() else GPU_DEFAULTS)


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
    model = load_pretrained(path, model_args.dtype, model_args.attn_implementation)
    if is_embedded(tok_path) and tok_path is not None:  # explicitly 'embedded'
        tokenizer = load_tokenizer(None, script_args.tokenizer_vocab_size)
    else:
        tokenizer = load_tokenizer(tok_path or path)
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
                metrics[f"{prefix}_perplexity"] = perplexity(metrics[f"{prefix}_loss"])
                self.log({f"{prefix}_perplexity": metrics[f"{prefix}_perplexity"]})
            return metrics

    return _PretrainTrainer


def check_arguments(script_args, training_args, model_args) -> None:
    """The pre-training flags, checked before anything is loaded or written."""
    s = script_args
    require_min(s, ("corpus_max_train_chars", "corpus_max_eval_chars"), 1, "must be at least 1 (unset = all)",
                optional=True)
    require(0 < s.corpus_heldout_percent < 100, "corpus_heldout_percent", s.corpus_heldout_percent,
            "must be in (0, 100): the percentage of the corpus's files held out")
    require(training_args.max_length is not None, "max_length", None,
            "pre-training packs documents into rows of max_length tokens: give a number (256 by default)")
    if model_args.use_peft:
        raise RecipeError("--use_peft: pre-training trains all the weights (the flag was ignored before); LoRA "
                          "adapters are for recipes/sft.py and recipes/dpo.py")
    if model_args.model_name_or_path:  # continual pre-training of that model
        check_model_path(model_args.model_name_or_path)
        if s.tokenizer_name_or_path == "embedded":
            check_vocab_size(s.tokenizer_vocab_size)
        return
    if is_embedded(s.tokenizer_name_or_path):
        check_vocab_size(s.tokenizer_vocab_size)
    check_shape(s.model_type, shape(s), training_args.max_length)  # from scratch: before anything is loaded


def final_eval_loss(trainer) -> float:
    """The held-out loss of the trained model: the evaluation logged at the last step, or a new one."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def main(argv=None) -> dict:
    from trl import ModelConfig

    from litespark_hf import SFTConfig
    from litespark_hf.data import load_corpus

    script_args, training_args, model_args, options = parse_args(
        (PretrainArguments, SFTConfig, ModelConfig), argv, defaults(), RECIPE)
    # Validate everything before anything is written.
    check_arguments(script_args, training_args, model_args)
    start = model_args.model_name_or_path  # set: continual pre-training of that model
    plan = plan_run(RECIPE, script_args, training_args, model_args)

    if start:
        model, tokenizer = load_existing(start, script_args, model_args)
    else:
        tokenizer = load_tokenizer(script_args.tokenizer_name_or_path, script_args.tokenizer_vocab_size)
    text_field = training_args.dataset_text_field

    def embedded():
        with main_process_first():
            return load_corpus(script_args.corpus_heldout_percent, script_args.corpus_max_train_chars,
                               script_args.corpus_max_eval_chars)

    train_ds, eval_ds, source = load_any_dataset(script_args, embedded, training_args.seed, text_field)
    check_columns(train_ds, [(text_field,)], RECIPE,
                  hint="pre-training reads plain text: set dataset_text_field to the text column")
    if not start:
        model = build_model(script_args.model_type, tokenizer, shape(script_args), model_args.dtype,
                            model_args.attn_implementation, seed=training_args.seed)
    if eval_ds is None or training_args.eval_strategy == "no":
        training_args.eval_strategy, training_args.eval_on_start, eval_ds = "no", False, None

    n_params = sum(p.numel() for p in model.parameters())
    model_type = model.config.model_type
    with OutputDir(plan, argv) as out:
        trainer = make_trainer_class()(
            model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        )
        install_model_card(trainer, RECIPE, start, source, script_args.dataset_config,
                           tags=[model_type] + (["continual-pretraining"] if start else []))
        attach_callbacks(trainer, options, out, training_type="pre-training")
        if start:
            ignored = ignored_architecture_flags(script_args)
            trainer.accelerator.print(
                f"[pretrain] continual pre-training of {start}: {model_type} model, {n_params / 1e6:.2f}M parameters,"
                f" vocab {model.config.vocab_size}, tokenizer: {script_args.tokenizer_name_or_path or start}, data: "
                f"{source}" + (f"; ignored architecture flags: {', '.join(ignored)}" if ignored else
                               "; architecture/shape flags are ignored (the model's own are kept)"))
        else:
            trainer.accelerator.print(f"[pretrain] {model_type} model, {n_params / 1e6:.2f}M parameters, "
                                      f"vocab {model.config.vocab_size}, data: {source}")
        train_out = trainer.train(resume_from_checkpoint=plan.resume)

        results = {"params_M": n_params / 1e6, "train_loss": train_out.training_loss,
                   "steps": trainer.state.global_step, "start": start or "from scratch"}
        if eval_ds is not None:
            # "before" is the evaluation at step 0 (eval_on_start), never a later one
            first = next((h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == 0),
                         None)
            final = final_eval_loss(trainer)
            results |= {"heldout_loss_before": first, "heldout_loss_after": final,
                        "heldout_ppl_before": perplexity(first), "heldout_ppl_after": perplexity(final)}
            if first is not None:
                trainer.accelerator.print(f"[pretrain] held-out loss {first:.3f} -> {final:.3f} "
                                          f"(perplexity {results['heldout_ppl_before']:.1f} -> "
                                          f"{results['heldout_ppl_after']:.1f})")
        save_all(trainer, tokenizer, training_args.output_dir, RECIPE, results)
    return results


if __name__ == "__main__":
    run_main(main)
