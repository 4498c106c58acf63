"""Direct preference optimisation with TRL's DPOTrainer (litespark_hf's subclass: ``--use_litespark`` works).

Data: ``prompt`` / ``chosen`` / ``rejected`` (conversational or text) or ``chosen`` / ``rejected`` with an implicit
prompt. Full training (the reference is a frozen copy of the start model) or LoRA with ``--use_peft`` (the
reference is the same model with its adapters disabled: no second copy in memory).

    python recipes/dpo.py                       # embedded default: generated preference pairs
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/dpo.py --config recipes/configs/dpo_tiny.yaml

Starts from ``--model_name_or_path``; unset, from outputs/sft if present, else outputs/pretrain, else a fresh tiny
Llama. Reports held-out preference accuracy (log p(chosen) > log p(rejected)) and the mean implicit reward margin
beta * (chosen log-ratio - rejected log-ratio) before and after.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recipe_utils.args import DataArguments, parse_args, require, require_min, training_defaults  # noqa: E402
from recipe_utils.card import install_model_card, save_all  # noqa: E402
from recipe_utils.data import check_columns, is_embedded, load_any_dataset  # noqa: E402
from recipe_utils.evaluation import completion_logps, single_process_model, whole_parameters  # noqa: E402
from recipe_utils.models import check_lora_targets, check_model_path, check_vocab_size, load_start  # noqa: E402
from recipe_utils.output_dir import OutputDir, plan_run  # noqa: E402
from recipe_utils.run import attach_callbacks, run_main  # noqa: E402

RECIPE = "dpo"


@dataclass
class DPOScriptArguments(DataArguments):
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer; unset = the model's."})
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the embedded tokenizer."})
    start_from: list[str] = field(default_factory=lambda: ["outputs/sft", "outputs/pretrain"],
                                  metadata={"help": "Model directories tried in order when model_name_or_path is "
                                                    "unset."})
    dpo_num_train: int = field(default=2000, metadata={"help": "Embedded set: training pairs."})
    dpo_num_eval: int = field(default=400, metadata={"help": "Embedded set: held-out pairs."})
    preference_eval_samples: int = field(default=400, metadata={"help": "Held-out pairs for the preference "
                                                                        "figures (0 = off)."})


def defaults() -> dict:
    return training_defaults("outputs/dpo") | dict(
        per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=3e-4,
        beta=0.5, max_length=128, eval_steps=50, max_steps=120,
    )


def check_arguments(script_args, training_args, model_args) -> None:
    """The DPO flags, checked before anything is loaded or written."""
    require_min(script_args, ("dpo_num_train", "dpo_num_eval"), 1)
    require_min(script_args, ("preference_eval_samples",), 0, "must not be negative (0 = off)")
    require(training_args.beta > 0, "beta", training_args.beta,
            "must be > 0 (the strength of the pull towards the reference model)")
    if model_args.model_name_or_path:
        check_model_path(model_args.model_name_or_path)
    elif is_embedded(script_args.tokenizer_name_or_path):
        check_vocab_size(script_args.tokenizer_vocab_size)


def preference_figures(model, tokenizer, ds, n):
    rows = ds.select(range(min(n, len(ds))))
    if not isinstance(rows[0]["chosen"], list) or "prompt" not in rows.column_names:
        return None  # the figures are computed for conversational data with an explicit prompt
    lc = completion_logps(model, tokenizer, rows["prompt"], rows["chosen"])
    lr = completion_logps(model, tokenizer, rows["prompt"], rows["rejected"])
    return lc, lr


def main(argv=None) -> dict:
    from trl import ModelConfig, get_peft_config

    from litespark_hf import DPOConfig, DPOTrainer
    from litespark_hf.data import dpo_dataset

    script_args, training_args, model_args, options = parse_args(
        (DPOScriptArguments, DPOConfig, ModelConfig), argv, defaults(), RECIPE)
    check_arguments(script_args, training_args, model_args)
    plan = plan_run(RECIPE, script_args, training_args, model_args)

    def embedded():
        return dpo_dataset(script_args.dpo_num_train, script_args.dpo_num_eval, seed=training_args.seed + 1)

    train_ds, eval_ds, source = load_any_dataset(script_args, embedded, training_args.seed)
    check_columns(train_ds, [("prompt", "chosen", "rejected"), ("chosen", "rejected")], RECIPE,
                  hint="preference data needs a preferred 'chosen' and a dispreferred 'rejected' answer")
    model, tokenizer, start = load_start(
        model_args.model_name_or_path, list(script_args.start_from), script_args.tokenizer_name_or_path,
        script_args.tokenizer_vocab_size, model_args.dtype, model_args.attn_implementation)
    check_lora_targets(model, model_args)
    heldout = eval_ds  # the figures below use the held-out split even when the trainer does not evaluate
    if eval_ds is None or training_args.eval_strategy == "no":
        training_args.eval_strategy, eval_ds = "no", None

    results = {"start": start.description}
    before = None
    if heldout is not None and script_args.preference_eval_samples > 0 and hasattr(heldout, "select") \
            and whole_parameters(model):  # not on a ZeRO-3 partitioned model (as after training)
        before = preference_figures(model, tokenizer, heldout, script_args.preference_eval_samples)
        if before is not None:
            results["heldout_pref_accuracy_before"] = (before[0] > before[1]).float().mean().item()
            results["heldout_pairs"] = len(before[0])
            # policy == reference: every implicit reward is 0, so no pair is won yet
            results["heldout_reward_margin_before"] = 0.0
            results["heldout_reward_accuracy_before"] = 0.0

    with OutputDir(plan, argv) as out:
        # TRL reloads the frozen reference from the start model's path; a fresh model has none: give it a copy
        ref_model = copy.deepcopy(model) if start.path is None and not model_args.use_peft else None
        trainer = DPOTrainer(
            model=model, ref_model=ref_model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
            processing_class=tokenizer, peft_config=get_peft_config(model_args),
        )
        install_model_card(trainer, RECIPE, start.path, source, script_args.dataset_config)
        attach_callbacks(trainer, options, out)
        trainer.accelerator.print(f"[dpo] start: {start.description}; data: {source}; "
                                  f"{'LoRA (reference = adapters disabled)' if model_args.use_peft else 'full'}")
        train_out = trainer.train(resume_from_checkpoint=plan.resume)
        results |= {"train_loss": train_out.training_loss, "steps": trainer.state.global_step}
        final = single_process_model(trainer)
        if before is not None and final is not None and trainer.is_world_process_zero():
            lc, lr = preference_figures(final, tokenizer, heldout, script_args.preference_eval_samples)
            margin = training_args.beta * ((lc - before[0]) - (lr - before[1]))
            results |= {"heldout_pref_accuracy_after": (lc > lr).float().mean().item(),
                        "heldout_reward_margin_after": margin.mean().item(),
                        "heldout_reward_accuracy_after": (margin > 0).float().mean().item()}
            trainer.accelerator.print(
                f"[dpo] {len(lc)} held-out pairs: log-prob preference accuracy "
                f"{results['heldout_pref_accuracy_before']:.1%} -> {results['heldout_pref_accuracy_after']:.1%}; "
                f"implicit reward accuracy {results['heldout_reward_accuracy_after']:.1%}, mean margin 0 -> "
                f"{results['heldout_reward_margin_after']:.3f}")
        save_all(trainer, tokenizer, training_args.output_dir, RECIPE, results)
    return results


if __name__ == "__main__":
    run_main(main)
