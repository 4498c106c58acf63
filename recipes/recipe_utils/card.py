"""The model card of a recipe run, and saving the final model, tokenizer, card and results.

TRL's own card (`trainer.create_model_card`) names the base model from ``config._name_or_path`` (``None`` for a
model built from scratch, giving ``[None](https://huggingface.co/None)`` and ``pipeline(..., model="None")``), links
every data set to the Hub (``datasets/embedded``) and says "trained with SFT" on a pre-training run. The recipes
replace that method on their trainer with `install_model_card`, so every card TRL writes (at each checkpoint save
and at the end) names the real start (a Hub model, a local directory, or "trained from scratch"), the real data (the
embedded default as such, local files by name, a Hub data set with its link) and the method (pre-training, SFT,
DPO). The Efficiency section is still added by ``litespark_hf.efficiency`` (it wraps the method installed here).
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .data import describe_source
from .evaluation import PROBE_ENV, write_logits_probe

METHODS = {
    "pretrain": ("pre-training", "causal language modelling (next-token prediction) on packed documents whose "
                 "positions restart at every document boundary"),
    "sft": ("supervised fine-tuning (SFT)", "next-token loss on the answers (or the whole text for plain-text data)"),
    "dpo": ("Direct Preference Optimization (DPO)",
            "[Rafailov et al., 2023](https://huggingface.co/papers/2305.18290): raise the log-probability ratio of the "
            "chosen answer over the rejected one against a frozen reference"),
}
EMBEDDED_DATA = {
    "pretrain": "the embedded default corpus of litespark_hf: the Python standard library's own source files, read "
                "offline (no download)",
    "sft": "the embedded default instruction set of litespark_hf: generated conversations (addition, the larger of "
           "two numbers, the successor of a number, repeating two words) with verifiable answers",
    "dpo": "the embedded default preference set of litespark_hf: generated pairs whose chosen answer is right and "
           "whose rejected answer is a near miss (off by one, the other number, the words swapped)",
}
TRAINERS = {"pretrain": "SFTTrainer (language-modelling path)", "sft": "SFTTrainer", "dpo": "DPOTrainer"}
TRL_CITATION = """@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "n/a"


def _is_hub_id(path: str | None) -> bool:
    return bool(path) and not os.path.exists(path) and path.count("/") <= 1 and not path.startswith((".", "/", "~"))


def _model_ref(path: str | None) -> str:
    if not path:
        return "none (trained from scratch)"
    return f"[{path}](https://huggingface.co/{path})" if _is_hub_id(path) else f"the local model `{path}`"


def _data_ref(recipe: str, source: str, config: str | None = None) -> str:
    d = describe_source(source)
    if d["kind"] == "embedded":
        return EMBEDDED_DATA[recipe]
    if d["kind"] == "local":
        files = d["files"]
        named = ", ".join(f"`{f}`" for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        where = "" if len(files) == 1 and os.path.isfile(source) else f" (`{source}`)"
        return f"local file{'s' if len(files) > 1 else ''} {named}{where}"
    return f"the [{source}](https://huggingface.co/datasets/{source}) dataset" + (f" ({config})" if config else "")


def _summary(recipe: str, start: str | None, data: str, model_type: str, n_params: int) -> str:
    size = f"{n_params / 1e6:,.2f}M parameters"
    if recipe == "pretrain":
        if start:
            return f"This model is {_model_ref(start)} ({model_type}, {size}) with continued pre-training on {data}."
        return f"This model is a {model_type} causal language model ({size}) pre-trained from scratch on {data}."
    method = METHODS[recipe][0]
    origin = f"a fine-tuned version of {_model_ref(start)}" if start else \
        f"a {model_type} model ({size}) trained from scratch (a freshly initialised model, no pre-training)"
    return f"This model is {origin}, trained with {method} on {data}."


def _quick_start(recipe: str, model_ref: str, chat: bool, source: str) -> list[str]:
    lines = ["```python", "from transformers import pipeline", "",
             f'generator = pipeline("text-generation", model="{model_ref}")']
    if chat:
        question = "What number comes after 41?" if describe_source(source)["kind"] == "embedded" else "Hello!"
        lines += [f'messages = [{{"role": "user", "content": "{question}"}}]',
                  'print(generator(messages, max_new_tokens=16, return_full_text=False)[0]["generated_text"])']
    else:
        prompt = "def fibonacci(n):" if recipe == "pretrain" and describe_source(source)["kind"] == "embedded" \
            else "Once upon a time"
        lines += [f'print(generator("{prompt}", max_new_tokens=64)[0]["generated_text"])']
    return lines + ["```"]


def _procedure(recipe: str, trainer, start: str | None, data: str) -> list[str]:
    a = trainer.args
    rows = [("Method", f"{METHODS[recipe][0]}: {METHODS[recipe][1]}"),
            ("Start", _model_ref(start)),
            ("Data", data),
            ("Trainer", f"TRL {TRAINERS[recipe]}, litespark_hf `recipes/{recipe}.py`"),
            ("Litespark kernels", "on" if getattr(a, "use_litespark", False) else "off (--use_litespark false)"),
            ("Optimizer steps", f"{trainer.state.global_step}" + (f" of {a.max_steps}" if a.max_steps > 0 else "")),
            ("Batch", f"{a.per_device_train_batch_size} per device x {a.gradient_accumulation_steps} accumulation x "
                      f"{a.world_size} process{'es' if a.world_size > 1 else ''}"),
            ("Learning rate", f"{a.learning_rate:g}, {getattr(a.lr_scheduler_type, 'value', a.lr_scheduler_type)} "
                              f"schedule, warm-up {a.warmup_steps:g}"),
            ("Precision", "bf16" if a.bf16 else ("fp16" if a.fp16 else "fp32"))]
    if getattr(a, "max_length", None):
        rows.append(("Max length", f"{a.max_length} tokens"))
    if recipe == "dpo":
        rows.append(("DPO beta", f"{a.beta:g}"))
    peft = getattr(trainer.model, "peft_config", None)
    if peft:
        cfg = next(iter(peft.values()))
        rows.append(("Adapters", f"LoRA r={getattr(cfg, 'r', '?')}, alpha={getattr(cfg, 'lora_alpha', '?')}"))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _results(recipe: str, results: dict) -> list[str]:
    lines = [f"## Results ({recipe}, litespark_hf recipes)", "", "| figure | value |", "|---|---|"]
    for k, v in results.items():
        if isinstance(v, list):
            v = "; ".join(str(x) for x in v)
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        lines.append(f"| {k} | {text.replace('|', '/')} |")
    return lines


def render_model_card(trainer, recipe: str, start: str | None, source: str, dataset_config: str | None = None,
                      tags=(), results: dict | None = None):
    """The card of a run as a `huggingface_hub.ModelCard` (valid YAML metadata, Hub fields only where true)."""
    from huggingface_hub import ModelCard, ModelCardData

    try:
        from litespark_hf.efficiency.card import END, START
    except ImportError:  # the section is then appended at the end of the card
        START = END = None

    a = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "causal LM")
    n_params = sum(p.numel() for p in model.parameters())
    name = a.hub_model_id.split("/")[-1] if getattr(a, "hub_model_id", None) else Path(a.output_dir).name
    data = _data_ref(recipe, source, dataset_config)
    src = describe_source(source)
    chat = recipe in ("sft", "dpo") and bool(getattr(trainer.processing_class, "chat_template", None))
    meta = ModelCardData(
        base_model=start if _is_hub_id(start) else None,
        datasets=[source] if src["kind"] == "hub" else None,
        library_name="transformers", model_name=name, pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["litespark_hf", "trl", recipe, *tags, model_type])),
    )
    lines = [f"# {name}", "", _summary(recipe, start, data, model_type, n_params), "",
             f"Trained with `recipes/{recipe}.py` of litespark_hf on [TRL](https://github.com/huggingface/trl)'s "
             f"{TRAINERS[recipe]}" + (", with the Litespark kernels." if getattr(a, "use_litespark", False) else "."),
             "", "## Quick start", "", *_quick_start(recipe, a.hub_model_id or a.output_dir, chat, source), "",
             "## Training procedure", "", *_procedure(recipe, trainer, start, data), ""]
    if results:
        lines += [*_results(recipe, results), ""]
    if START:
        lines += [START, END, ""]
    lines += ["### Framework versions", ""] + [f"- {p}: {_version(p)}" for p in
                                               ("litespark_hf", "trl", "transformers", "torch", "datasets",
                                                "tokenizers")]
    lines += ["", "## Citations", ""]
    paper = getattr(trainer, "_paper", None) or {}
    if recipe == "dpo" and paper.get("citation"):
        lines += ["Cite DPO as:", "", "```bibtex", paper["citation"].strip(), "```", ""]
    lines += ["Cite TRL as:", "", "```bibtex", TRL_CITATION, "```", ""]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines))


def install_model_card(trainer, recipe: str, start: str | None, source: str, dataset_config: str | None = None,
                       tags=()) -> None:
    """Make ``trainer.create_model_card`` (called by TRL at every checkpoint save, and by `save_all`) write this
    recipe's card. Call it before `attach_callbacks` (the efficiency tracker wraps the method installed here)."""

    def create_model_card(*args, results: dict | None = None, **kwargs):
        if not trainer.is_world_process_zero():
            return
        card = render_model_card(trainer, recipe, start, source, dataset_config, tags, results)
        card.save(os.path.join(trainer.args.output_dir, "README.md"))

    trainer.create_model_card = create_model_card


def save_model(trainer, output_dir: str) -> None:
    """``trainer.save_model(output_dir)``, also under FSDP with a sharded state-dict type.

    transformers' ``Trainer.save_model`` writes the weights under FSDP only for ``FULL_STATE_DICT``; with
    ``SHARDED_STATE_DICT`` (``accelerate_configs/fsdp2.yaml``: fast sharded checkpoints) it writes nothing, and the
    output directory would hold no model. Then the full state dict is gathered here (a collective: every process
    calls it; `Accelerator.get_state_dict`) and the main process writes it with the Trainer's own ``_save`` (weights,
    config), so the directory loads with plain ``from_pretrained``. Checkpoints keep the configured type."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and plugin is not None \
            and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.args.should_save:
            trainer._save(output_dir, state_dict=state_dict)
        return
    trainer.save_model(output_dir)


def save_all(trainer, tokenizer, output_dir: str, recipe: str, results: dict):
    """Save the model and tokenizer, write the model card (with a results section) and results.json (and, when
    ``LITESPARK_LOGITS_PROBE`` names a file, the in-run model's logits on a fixed batch: `write_logits_probe`)."""
    save_model(trainer, output_dir)
    probe = os.environ.get(PROBE_ENV)
    if probe:
        write_logits_probe(trainer, probe)
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(output_dir)
    try:
        trainer.create_model_card(results=results)
    except Exception as e:  # noqa: BLE001 - the card must not lose a finished run
        print(f"[{recipe}] writing the model card failed ({e}); writing a minimal one", file=sys.stderr)
        (Path(output_dir) / "README.md").write_text(f"---\ntags: [litespark_hf, {recipe}]\n---\n# "
                                                    f"{Path(output_dir).name}\n")
    (Path(output_dir) / "results.json").write_text(json.dumps(results, indent=1, default=str))
