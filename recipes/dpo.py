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

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

RECIPE = "dpo"


@dataclass
class DPOScriptArguments(common.DataArguments):
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
    return common.common_training_defaults("outputs/dpo") | dict(
        max_steps=120, per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=3e-4,
        beta=0.5, max_length=128, eval_steps=50,
    )


def preference_figures(model, tokenizer, ds, n):
    rows = ds.select(range(min(n, len(ds))))
    if not isinstance(rows[0]["chosen"], list) or "prompt" not in rows.column_names:
        return None  # the figures are computed for conversational data with an explicit prompt
    lc = common.completion_logps(model, tokenizer, rows["prompt"], rows["chosen"])
    lr = common.completion_logps(model, tokenizer, rows["prompt"], rows["rejected"])
    return lc, lr


def main(argv=None) -> dict:
    from trl import ModelConfig, get_peft_config

    from litespark_hf import DPOConfig, DPOTrainer
    from litespark_hf.data import dpo_dataset

    script_args, training_args, model_args, options = common.parse_args(
        (DPOScriptArguments, DPOConfig, ModelConfig), argv,
        defaults())
    resume, fp, clear = common.check_run(RECIPE, script_args, training_args, model_args)

    def embedded():
        return dpo_dataset(script_args.dpo_num_train, script_args.dpo_num_eval, seed=training_args.seed + 1)

    train_ds, eval_ds, source = common.load_any_dataset(script_args, embedded, training_args.seed)
    common.check_columns(train_ds, [("prompt", "chosen", "rejected"), ("chosen", "rejected")], RECIPE,
                         hint="preference data needs a preferred 'chosen' and a dispreferred 'rejected' answer")
    model, tokenizer, start = common.load_start(
        model_args.model_name_or_path, list(script_args.start_from), script_args.tokenizer_name_or_path,
        script_args.tokenizer_vocab_size, model_args.dtype, model_args.attn_implementation)
    heldout = eval_ds  # the figures below use the held-out split even when the trainer does not evaluate
    if eval_ds is None or training_args.eval_strategy == "no":
        training_args.eval_strategy, eval_ds = "no", None

    results = {"start": start}
    before = None
    if heldout is not None and script_args.preference_eval_samples > 0 and hasattr(heldout, "select"):
        before = preference_figures(model, tokenizer, heldout, script_args.preference_eval_samples)
        if before is not None:
            results["heldout_pref_accuracy_before"] = (before[0] > before[1]).float().mean().item()
            results["heldout_pairs"] = len(before[0])
            # policy == reference: every implicit reward is 0, so no pair is won yet
            results["heldout_reward_margin_before"] = 0.0
            results["heldout_reward_accuracy_before"] = 0.0

    common.prepare_output_dir(training_args.output_dir, RECIPE, fp, clear, argv)
    trainer = DPOTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    common.attach_callbacks(trainer, options)
    trainer.accelerator.print(f"[dpo] start: {start}; data: {source}; "
                              f"{'LoRA (reference = adapters disabled)' if model_args.use_peft else 'full'}")
    train_out = trainer.train(resume_from_checkpoint=resume)
    results |= {"train_loss": train_out.training_loss, "steps": trainer.state.global_step}
    final = common.single_process_model(trainer)
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
    common.save_all(trainer, tokenizer, training_args.output_dir, RECIPE, source, results)
    return results


if __name__ == "__main__":
    common.run_main(main)
