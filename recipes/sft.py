"""Supervised fine-tuning with TRL's SFTTrainer (litespark_hf's subclass: ``--use_litespark`` works).

Data: conversational (``messages``), prompt/completion, or plain text (``dataset_text_field``); packing
(``--packing``, best-fit, document boundaries kept) and padding-free batches (``--padding_free``, on by default).
Full fine-tuning, or LoRA with ``--use_peft --lora_r 16 ...`` (TRL's ModelConfig flags).

    python recipes/sft.py                       # embedded default: generated arithmetic / copy tasks
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/sft.py --config recipes/configs/sft_tiny.yaml
    python recipes/sft.py --model_name_or_path my/model --dataset_name data.jsonl --use_peft

Starts from ``--model_name_or_path``; unset, from the pre-training recipe's default output (outputs/pretrain) if
present, else a fresh tiny Llama. On conversational held-out data it reports greedy exact match before and after.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recipe_utils import RecipeError  # noqa: E402
from recipe_utils.args import EMBEDDED, DataArguments, parse_args, require_min, training_defaults  # noqa: E402
from recipe_utils.card import install_model_card, save_all  # noqa: E402
from recipe_utils.data import check_columns, is_embedded, load_any_dataset  # noqa: E402
from recipe_utils.evaluation import (conversational_eval_pairs, greedy_exact_match, single_process_model,  # noqa: E402
                                     whole_parameters)
from recipe_utils.models import check_lora_targets, check_model_path, check_vocab_size, load_start  # noqa: E402
from recipe_utils.output_dir import OutputDir, plan_run  # noqa: E402
from recipe_utils.run import attach_callbacks, run_main  # noqa: E402

RECIPE = "sft"


@dataclass
class SFTScriptArguments(DataArguments):
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer; unset = the model's "
                                                                                "(or the embedded one)."})
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the embedded tokenizer."})
    start_from: str = field(default="outputs/pretrain", metadata={"help": "Model directory used when "
                                                                          "model_name_or_path is unset (if present)."})
    sft_num_train: int = field(default=2000, metadata={"help": "Embedded set: training examples."})
    sft_num_eval: int = field(default=200, metadata={"help": "Embedded set: held-out examples."})
    exact_match_samples: int = field(default=200, metadata={"help": "Held-out prompts for greedy exact match "
                                                                    "(conversational data; 0 = off)."})
    exact_match_max_new_tokens: int = field(default=8, metadata={"help": "Tokens generated per exact-match prompt."})


def defaults() -> dict:
    return training_defaults("outputs/sft") | dict(
        per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=3e-3,
        weight_decay=0.0, max_length=None, packing=False, padding_free=True, eval_steps=100, max_steps=500,
    )


def check_arguments(script_args, training_args, model_args) -> None:
    """The SFT flags, checked before anything is loaded or written."""
    require_min(script_args, ("sft_num_train", "sft_num_eval", "exact_match_max_new_tokens"), 1)
    require_min(script_args, ("exact_match_samples",), 0, "must not be negative (0 = off)")
    if model_args.model_name_or_path:
        check_model_path(model_args.model_name_or_path)
    elif is_embedded(script_args.tokenizer_name_or_path):
        check_vocab_size(script_args.tokenizer_vocab_size)
    if training_args.packing and training_args.max_length is None:
        raise RecipeError("--packing true packs examples into rows of max_length tokens: give --max_length (e.g. 512)")
    if training_args.padding_free and not training_args.packing and training_args.max_length is not None:
        raise RecipeError("padding_free without packing does not truncate: set max_length null, or --packing true")


def main(argv=None) -> dict:
    from trl import ModelConfig, get_peft_config

    from litespark_hf import SFTConfig, SFTTrainer
    from litespark_hf.data import sft_dataset

    script_args, training_args, model_args, options = parse_args(
        (SFTScriptArguments, SFTConfig, ModelConfig), argv, defaults(), RECIPE)
    check_arguments(script_args, training_args, model_args)
    plan = plan_run(RECIPE, script_args, training_args, model_args)

    def embedded():
        return sft_dataset(script_args.sft_num_train, script_args.sft_num_eval, seed=training_args.seed)

    train_ds, eval_ds, source = load_any_dataset(script_args, embedded, training_args.seed,
                                                 training_args.dataset_text_field)
    fmt = check_columns(train_ds, [("messages",), ("prompt", "completion"), (training_args.dataset_text_field,)],
                        RECIPE, hint="conversational data needs 'messages'; plain text: set dataset_text_field")
    if source == EMBEDDED and fmt == ("messages",):
        training_args.assistant_only_loss = True  # train on the answers only (the template marks them)
    model, tokenizer, start = load_start(
        model_args.model_name_or_path, [script_args.start_from], script_args.tokenizer_name_or_path,
        script_args.tokenizer_vocab_size, model_args.dtype, model_args.attn_implementation)
    check_lora_targets(model, model_args)
    heldout = eval_ds  # the figures below use the held-out split even when the trainer does not evaluate
    if eval_ds is None or training_args.eval_strategy == "no":
        training_args.eval_strategy, eval_ds = "no", None
    if fmt == ("messages",) and not tokenizer.chat_template:
        raise RecipeError("conversational data needs a tokenizer with a chat template; give "
                          "--tokenizer_name_or_path of one that has it, or use prompt/completion or text data")

    pairs = conversational_eval_pairs(heldout, script_args.exact_match_samples)
    results = {"start": start.description}
    if pairs and whole_parameters(model):  # not on a ZeRO-3 partitioned model (as after training)
        em_before, _ = greedy_exact_match(model, tokenizer, *pairs, script_args.exact_match_max_new_tokens)
        results["heldout_exact_match_before"] = em_before

    with OutputDir(plan, argv) as out:
        trainer = SFTTrainer(
            model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
            processing_class=tokenizer, peft_config=get_peft_config(model_args),
        )
        install_model_card(trainer, RECIPE, start.path, source, script_args.dataset_config)
        attach_callbacks(trainer, options, out)
        trainer.accelerator.print(f"[sft] start: {start.description}; data: {source} ({fmt}); "
                                  f"{'LoRA' if model_args.use_peft else 'full fine-tuning'}")
        train_out = trainer.train(resume_from_checkpoint=plan.resume)
        results |= {"train_loss": train_out.training_loss, "steps": trainer.state.global_step}
        if eval_ds is not None:
            results["heldout_loss_after"] = trainer.evaluate()["eval_loss"]
        final = single_process_model(trainer)
        if pairs and final is not None and trainer.is_world_process_zero():
            em_after, outs = greedy_exact_match(final, tokenizer, *pairs, script_args.exact_match_max_new_tokens)
            results["heldout_exact_match_after"] = em_after
            results["examples"] = [f"{p[-1]['content']} -> {o!r} (want {a!r})" for p, a, o in
                                   list(zip(*pairs, outs))[:4]]
            trainer.accelerator.print(f"[sft] held-out exact match {results['heldout_exact_match_before']:.1%} -> "
                                      f"{em_after:.1%} ({len(pairs[0])} prompts, greedy)")
        save_all(trainer, tokenizer, training_args.output_dir, RECIPE, results)
    return results


if __name__ == "__main__":
    run_main(main)
