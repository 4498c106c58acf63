"""Code shared by the recipes (pretrain.py, sft.py, dpo.py, chain.py): argument parsing with a checked YAML config,
dataset / tokenizer / model loading (Hub, local files, or the offline embedded default), output-directory and resume
checks, the held-out figures (loss, exact match, preference accuracy) and the model card.

Every user mistake raises `RecipeError` with one message that says what to change, before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

RUN_MARKER = "litespark_run.json"
LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
EMBEDDED = "embedded"


class RecipeError(ValueError):
    """A mistake in a recipe's input; the message says what to change."""


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DataArguments:
    """Dataset and output arguments shared by the three recipes."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset name, a local file / directory / glob (.jsonl, .json, .parquet, .txt, .csv), "
                          f"or unset / '{EMBEDDED}' for the offline embedded default."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split (made from the train split "
                                                                     "with `eval_fraction` when absent)."})
    eval_fraction: float = field(default=0.02, metadata={"help": "Held-out fraction when the dataset has no test "
                                                                   "split."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset (Hub or local files; needs "
                                                                      "max_steps > 0)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N held-out rows."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an output_dir that holds another run of a recipe (never a directory with "
                          "other files)."},
    )


def _all_fields(dataclass_types) -> set[str]:
    return {f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init}


def parse_args(dataclass_types, argv=None, defaults: dict | None = None):
    """`TrlParser(...).parse_args_and_config()` with recipe defaults (a YAML ``--config`` and the command line
    override them) and a clear message for a YAML key that matches no argument."""
    import yaml
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    dataclass_types = (*dataclass_types, _litespark_options_class())
    parser = TrlParser(dataclass_types)
    if defaults:
        parser.set_defaults(**defaults)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a YAML file path, e.g. --config recipes/configs/pretrain_tiny.yaml")
        path = argv[i + 1]
        if not os.path.isfile(path):
            raise RecipeError(f"config file {path} does not exist; pass a YAML file such as "
                              "recipes/configs/pretrain_tiny.yaml")
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise RecipeError(f"config file {path} must hold a YAML mapping of argument: value")
        known = _all_fields(dataclass_types) | {"env"}
        unknown = [k for k in config if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise RecipeError(f"config file {path}: {', '.join(hints)} match no argument of this recipe; fix or "
                              f"remove {'them' if len(unknown) > 1 else 'it'} (python {sys.argv[0] or 'recipe'} "
                              "--help lists the arguments)")
    *parsed, options = parser.parse_args_and_config(args=argv)
    litespark_config_from(parsed[1], options)
    return (*parsed, options)


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def common_training_defaults(output_dir: str) -> dict:
    """Defaults of every recipe (a YAML config or the command line overrides them)."""
    return dict(
        output_dir=output_dir, bf16=bf16_supported(), fp16=False, use_cpu=cpu_only(), report_to="none",
        gradient_checkpointing=False, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=10,
        eval_strategy="steps", eval_steps=100, save_strategy="steps", save_steps=100, save_total_limit=2,
        dataloader_num_workers=0, seed=42,
    )


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def is_embedded(name: str | None) -> bool:
    return name is None or name.strip() in ("", EMBEDDED)


def _local_files(name: str) -> list[str] | None:
    """The data files named by a local path, directory or glob, or None when ``name`` is not local."""
    if os.path.isdir(name):
        files = sorted(p for p in glob.glob(os.path.join(name, "**", "*"), recursive=True)
                       if Path(p).suffix in LOCAL_EXTENSIONS)
        if not files:
            raise RecipeError(f"directory {name} holds no data files ({', '.join(LOCAL_EXTENSIONS)})")
        return files
    if any(c in name for c in "*?["):
        files = sorted(glob.glob(name))
        if not files:
            raise RecipeError(f"no file matches {name}")
        return files
    if os.path.isfile(name):
        return [name]
    if Path(name).suffix in LOCAL_EXTENSIONS or name.startswith((".", "/", "~")):
        raise RecipeError(f"dataset file {name} does not exist; give an existing path, or unset dataset_name for "
                          "the embedded default")
    return None


def load_any_dataset(data_args: DataArguments, embedded_fn, seed: int = 42, text_field: str = "text"):
    """``(train, test_or_None, source)`` from the embedded default, local files or the Hub.

    Offline (``HF_HUB_OFFLINE=1``), a Hub dataset that is not in the local cache fails with one message.
    """
    import datasets

    name = data_args.dataset_name
    if is_embedded(name):
        dd = embedded_fn()
        return _cap(dd["train"], data_args.max_train_samples), _cap(dd["test"], data_args.max_eval_samples), EMBEDDED
    files = _local_files(name)
    if files is not None:
        exts = {Path(f).suffix for f in files}
        if len(exts) > 1:
            raise RecipeError(f"dataset {name} mixes file types {sorted(exts)}; give files of one type")
        builder = LOCAL_EXTENSIONS[exts.pop()]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            dd = datasets.load_dataset(builder, data_files={"train": files}, streaming=data_args.dataset_streaming,
                                       **kwargs)
        except Exception as e:  # noqa: BLE001 - turned into one message
            raise RecipeError(f"cannot read dataset files {files[:3]}{'...' if len(files) > 3 else ''} as "
                              f"{builder}: {e}") from e
        if builder == "text" and text_field != "text":
            dd = dd.rename_column("text", text_field)
        source = name
    else:
        try:
            dd = datasets.load_dataset(name, name=data_args.dataset_config, streaming=data_args.dataset_streaming)
        except Exception as e:  # noqa: BLE001
            if hub_offline():
                raise RecipeError(
                    f"dataset '{name}' is not a local file and cannot be loaded while offline (HF_HUB_OFFLINE=1) "
                    "and not cached; unset dataset_name to train on the embedded default, pass local files "
                    "(.jsonl/.parquet/.txt), or run online (HF_HUB_OFFLINE=0)"
                ) from e
            raise RecipeError(f"cannot load dataset '{name}': {e}") from e
        source = name
    if data_args.dataset_train_split not in dd:
        raise RecipeError(f"dataset {name} has no split '{data_args.dataset_train_split}' (splits: {list(dd)}); "
                          "set dataset_train_split")
    train = dd[data_args.dataset_train_split]
    test = dd[data_args.dataset_test_split] if data_args.dataset_test_split in dd else None
    if test is None and data_args.eval_fraction > 0:
        if data_args.dataset_streaming:
            n_eval = data_args.max_eval_samples or 200
            test, train = train.take(n_eval), train.skip(n_eval)
        else:
            split = train.train_test_split(test_size=data_args.eval_fraction, seed=seed)
            train, test = split["train"], split["test"]
    return _cap(train, data_args.max_train_samples), _cap(test, data_args.max_eval_samples), source


def _cap(ds, n):
    if ds is None or n is None:
        return ds
    if hasattr(ds, "select"):
        return ds.select(range(min(n, len(ds))))
    return ds.take(n)


def column_names(ds) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is None:  # streaming dataset without known features: peek at one row
        names = list(next(iter(ds)).keys())
    return list(names)


def check_columns(ds, accepted: list[tuple[str, ...]], recipe: str, hint: str = ""):
    """Fail unless the dataset has all the columns of one of the ``accepted`` column sets; return that set."""
    names = column_names(ds)
    for cols in accepted:
        if all(c in names for c in cols):
            return cols
    wanted = " or ".join("+".join(f"'{c}'" for c in cols) for cols in accepted)
    close = []
    for cols in accepted:
        for c in cols:
            m = difflib.get_close_matches(c, names, n=1, cutoff=0.6)
            if m and m[0] != c:
                close.append(f"'{m[0]}' -> '{c}'")
    raise RecipeError(f"{recipe} needs dataset columns {wanted}, but the dataset has {names}"
                      + (f"; rename {', '.join(close)}" if close else "") + (f"; {hint}" if hint else ""))


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------------------------------
def main_process_first():
    from accelerate import PartialState

    return PartialState().main_process_first()


def load_tokenizer(name_or_path: str | None, vocab_size: int | None = None):
    """The tokenizer at ``name_or_path`` (any HF tokenizer), or the embedded one when unset / 'embedded'."""
    from transformers import AutoTokenizer

    from litespark_hf.data import DEFAULT_VOCAB_SIZE, load_embedded_tokenizer

    if is_embedded(name_or_path):
        with main_process_first():
            return load_embedded_tokenizer(vocab_size or DEFAULT_VOCAB_SIZE)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001
        extra = " (offline: HF_HUB_OFFLINE=1; give a local directory)" if hub_offline() else ""
        raise RecipeError(f"cannot load tokenizer '{name_or_path}'{extra}: {e}; unset tokenizer_name_or_path for "
                          "the embedded tokenizer") from e
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


def build_model(model_type: str, tokenizer, shape: dict, dtype=None, attn_implementation: str | None = None,
                seed: int = 42):
    """A randomly initialised causal LM of ``model_type`` sized by ``shape`` (config keys), vocabulary sized to the
    tokenizer unless ``shape['vocab_size']`` is given (a larger one is fine: it is rounded for the tokenizer).
    The initialisation is seeded by ``seed``, so every process and every launch (1 or N processes) starts from the
    same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    check_model_type(model_type)
    shape = {k: v for k, v in shape.items() if v is not None}
    vocab = shape.pop("vocab_size", None) or len(tokenizer)
    if vocab < len(tokenizer):
        raise RecipeError(f"vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens; raise it or "
                          "unset it (the tokenizer's size is used)")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        cfg.dtype = dtype
    # use_cache=False: with a cache object the model ignores packed position_ids (cross-document attention).
    cfg.use_cache = False
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    set_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype if dtype not in (None, "auto") else None, **kwargs)


def load_pretrained(path: str, dtype=None, attn_implementation: str | None = None):
    """A causal LM from a directory or Hub name; a PEFT adapter directory is merged into its base model."""
    from transformers import AutoModelForCausalLM

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
    except Exception as e:  # noqa: BLE001
        extra = " (offline: HF_HUB_OFFLINE=1; give a local directory)" if hub_offline() else ""
        raise RecipeError(f"cannot load model '{path}'{extra}: {e}") from e
    model.config.use_cache = False  # training: a cache object would make the model ignore packed position_ids
    return model


def has_model(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "adapter_config.json")))


# --------------------------------------------------------------------------------------------------------------------
# Output directory and resume
# --------------------------------------------------------------------------------------------------------------------
_FINGERPRINT_SKIP = {"output_dir", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir", "report_to",
                     "disable_tqdm", "run_name", "hub_token", "push_to_hub", "logging_steps", "eval_steps",
                     "save_steps", "save_total_limit", "dataloader_num_workers", "local_rank", "eval_strategy",
                     "save_strategy", "logging_strategy"}


def check_run(recipe: str, script_args, training_args, model_args) -> tuple[str | None, str, bool]:
    """The checks every recipe makes before writing anything: the checkpoint to resume from (or None), the run's
    fingerprint, whether ``output_dir`` must be cleared (another run of a recipe, with --overwrite_output_dir), and
    streaming needing ``max_steps``."""
    resume = resolve_resume(training_args.output_dir, training_args.resume_from_checkpoint)
    fp = fingerprint(script_args, training_args, model_args)
    clear = check_output_dir(training_args.output_dir, recipe, fp, script_args.overwrite_output_dir,
                             resume is not None)
    if script_args.dataset_streaming and training_args.max_steps <= 0:
        raise RecipeError("dataset_streaming needs max_steps > 0 (a stream has no length)")
    return resume, fp, clear


def fingerprint(*arg_objects) -> str:
    items = {}
    for obj in arg_objects:
        for f in dataclasses.fields(obj):
            if f.init and f.name not in _FINGERPRINT_SKIP:
                items[f"{type(obj).__name__}.{f.name}"] = getattr(obj, f.name, None)
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _marker(output_dir) -> dict | None:
    p = Path(output_dir) / RUN_MARKER
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def resolve_resume(output_dir: str, resume) -> str | None:
    """The checkpoint to resume from (``True``/'true'/'latest' = the newest in output_dir), or a RecipeError."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True", "latest", "last"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise RecipeError(f"resume_from_checkpoint asks for the latest checkpoint, but {output_dir} holds no "
                              "checkpoint-* directory; drop --resume_from_checkpoint to start afresh, or set "
                              "output_dir to the run to continue")
        return last
    if not os.path.isfile(os.path.join(str(resume), "trainer_state.json")):
        raise RecipeError(f"checkpoint {resume} does not exist (no trainer_state.json there); give an existing "
                          f"checkpoint-* directory, or 'true' for the newest one in output_dir")
    return str(resume)


def check_output_dir(output_dir: str, recipe: str, fp: str, overwrite: bool, resuming: bool) -> bool:
    """Decide, without writing anything, whether ``output_dir`` may be used. Returns True when an earlier run there
    must be cleared first (same recipe and arguments, or ``overwrite_output_dir``)."""
    p = Path(output_dir)
    if not p.exists():
        return False
    if not p.is_dir():
        raise RecipeError(f"output_dir {output_dir} is a file; choose a directory")
    if not any(p.iterdir()):
        return False
    marker = _marker(p)
    if marker is None:
        raise RecipeError(f"output_dir {output_dir} already holds files that are not a litespark recipe run; "
                          "choose a new or empty --output_dir")
    other = marker.get("recipe")
    if resuming:
        if other != recipe:
            raise RecipeError(f"cannot resume {recipe} in {output_dir}: it holds a {other} run; choose that run's "
                              "recipe or another --output_dir")
        return False
    if other == recipe and marker.get("fingerprint") == fp:
        return True  # the same run again: replace it
    if overwrite:
        return True
    raise RecipeError(f"output_dir {output_dir} already holds another run ({other}, different arguments); pass "
                      "--overwrite_output_dir true to replace it, --resume_from_checkpoint true to continue it, or "
                      "choose another --output_dir")


def prepare_output_dir(output_dir: str, recipe: str, fp: str, clear: bool, argv=None):
    """Clear an earlier run (main process only) and write the run marker; every process waits."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        p = Path(output_dir)
        if clear and p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
        (p / RUN_MARKER).write_text(json.dumps({"recipe": recipe, "fingerprint": fp,
                                                "argv": list(sys.argv[1:] if argv is None else argv)}, indent=1))
    state.wait_for_everyone()


def _litespark_options_class():
    from litespark_hf import LitesparkConfig

    @dataclass
    class RecipeOptions(LitesparkConfig):
        """Efficiency tracking, plus every `LitesparkConfig` option (``--sat_omission_rate_mlp 0.5``, ...) as a flag.

        The LitesparkConfig flags take effect with ``--use_litespark``; set ones override ``--litespark_config``.
        """

        track_efficiency: bool = field(
            default=True,
            metadata={"help": "Track tokens/s, MFU, peak memory and energy/CO2 (CodeCarbon, offline) into the logs, "
                              "efficiency.json, efficiency.png and the model card."},
        )
        energy_country_iso_code: str | None = field(
            default=None,
            metadata={"help": "3-letter country code of the machine for the carbon intensity (default: "
                              "LITESPARK_COUNTRY_ISO_CODE or USA)."},
        )

    return RecipeOptions


def litespark_config_from(training_args, options) -> None:
    """Fold the LitesparkConfig flags that differ from their defaults into ``training_args.litespark_config``."""
    from litespark_hf import LitesparkConfig

    base = LitesparkConfig.from_any(getattr(training_args, "litespark_config", None)).to_dict()
    defaults = LitesparkConfig().to_dict()
    changed = {k: getattr(options, k) for k in defaults if getattr(options, k) != defaults[k]}
    if changed:
        training_args.litespark_config = json.dumps({**base, **changed})
        if not training_args.use_litespark:
            raise RecipeError(f"{', '.join('--' + k for k in changed)} need --use_litespark")


# --------------------------------------------------------------------------------------------------------------------
# Callbacks (single place where the recipes' callbacks are attached)
# --------------------------------------------------------------------------------------------------------------------
def attach_callbacks(trainer, options) -> None:
    """Efficiency tracking (on by default) first in line, so the loggers see its keys. SAT's callback is added by
    the trainer itself when ``--use_litespark`` with a SAT omission rate is given."""
    if options.track_efficiency:
        from litespark_hf.efficiency import track_efficiency

        track_efficiency(trainer, country_iso_code=options.energy_country_iso_code)


# --------------------------------------------------------------------------------------------------------------------
# Held-out figures
# --------------------------------------------------------------------------------------------------------------------
def single_process_model(trainer):
    """The full model when every process holds one (no FSDP / DeepSpeed sharding), else None."""
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    return trainer.accelerator.unwrap_model(trainer.model)


def _chat_ids(tokenizer, messages, add_generation_prompt):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


@torch.no_grad()
def greedy_exact_match(model, tokenizer, prompts: list, answers: list[str], max_new_tokens: int = 8,
                       batch_size: int = 64) -> tuple[float, list[str]]:
    """Fraction of conversational ``prompts`` whose greedy answer equals ``answers`` (whitespace-stripped)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outs = []
    for i in range(0, len(prompts), batch_size):
        ids = [_chat_ids(tokenizer, p, True) for p in prompts[i:i + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                             use_cache=True)
        outs += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    model.train(was_training)
    em = sum(o == a.strip() for o, a in zip(outs, answers)) / max(len(answers), 1)
    return em, outs


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list, completions: list, batch_size: int = 64) -> torch.Tensor:
    """Summed log-probability of each conversational completion given its prompt (chat template applied)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for p, c in zip(prompts, completions):
        prompt_ids = _chat_ids(tokenizer, p, True)
        full = _chat_ids(tokenizer, list(p) + list(c), False)
        rows.append((full, len(prompt_ids)))
    out = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        width = max(len(f) for f, _ in part)
        ids = torch.tensor([f + [tokenizer.pad_token_id] * (width - len(f)) for f, _ in part], device=device)
        mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f, _ in part], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = torch.zeros_like(logp)
        for j, (f, n_prompt) in enumerate(part):
            keep[j, n_prompt - 1:len(f) - 1] = 1
        out.append((logp * keep).sum(-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


# --------------------------------------------------------------------------------------------------------------------
# Saving: model, tokenizer, model card, results
# --------------------------------------------------------------------------------------------------------------------
def save_all(trainer, tokenizer, output_dir: str, recipe: str, dataset_name: str, results: dict, tags=()):
    """Save the model and tokenizer, write the model card (TRL's, plus a results section) and results.json."""
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(output_dir)
    try:
        trainer.create_model_card(model_name=Path(output_dir).name, dataset_name=dataset_name,
                                  tags=["litespark_hf", recipe, *tags])
    except Exception as e:  # noqa: BLE001 - the card must not lose a finished run
        print(f"[{recipe}] model card from TRL failed ({e}); writing a minimal one", file=sys.stderr)
        (Path(output_dir) / "README.md").write_text(f"---\ntags: [litespark_hf, {recipe}]\n---\n# {Path(output_dir).name}\n")
    card = Path(output_dir) / "README.md"
    lines = ["", f"## Results ({recipe}, litespark_hf recipes)", "", "| figure | value |", "|---|---|"]
    for k, v in results.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    with open(card, "a") as f:
        f.write("\n".join(lines) + "\n")
    (Path(output_dir) / "results.json").write_text(json.dumps(results, indent=1, default=str))


def run_main(main):
    """Entry point: run ``main()``, turning a RecipeError into one line on stderr and exit status 2."""
    try:
        main()
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------------------------------
# Starting point of sft.py / dpo.py
# --------------------------------------------------------------------------------------------------------------------
TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, max_position_embeddings=4096, tie_word_embeddings=True)


def load_start(model_name_or_path: str | None, fallbacks: list[str], tokenizer_name_or_path: str | None,
               vocab_size: int, dtype=None, attn_implementation=None):
    """``(model, tokenizer, description)``: the given model, else the first fallback directory holding a model
    (the previous recipe's default output), else a fresh tiny Llama on the embedded tokenizer."""
    path = model_name_or_path or next((p for p in fallbacks if has_model(p)), None)
    if path:
        model = load_pretrained(path, dtype, attn_implementation)
        tok_path = tokenizer_name_or_path or path
        tokenizer = load_tokenizer(tok_path) if not is_embedded(tok_path) else load_tokenizer(None, vocab_size)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise RecipeError(f"tokenizer has {len(tokenizer)} tokens but model {path} only "
                              f"{model.get_input_embeddings().num_embeddings} embeddings; give the model's tokenizer")
        return model, tokenizer, path
    tokenizer = load_tokenizer(tokenizer_name_or_path, vocab_size)
    model = build_model("llama", tokenizer, TINY_SHAPE, dtype, attn_implementation)
    return model, tokenizer, "fresh tiny llama (no pre-trained model found)"


def conversational_eval_pairs(ds, n: int):
    """``(prompts, answers)`` from the first ``n`` rows of a conversational held-out set (last assistant turn =
    answer), or None when the rows are not conversational."""
    if ds is None or n <= 0:
        return None
    names = column_names(ds)
    rows = ds.select(range(min(n, len(ds)))) if hasattr(ds, "select") else list(ds.take(n))
    prompts, answers = [], []
    for r in rows:
        if "messages" in names and isinstance(r["messages"], list) and r["messages"] and \
                r["messages"][-1].get("role") == "assistant":
            prompts.append(r["messages"][:-1])
            answers.append(r["messages"][-1]["content"])
        elif "prompt" in names and "completion" in names and isinstance(r["prompt"], list):
            prompts.append(r["prompt"])
            answers.append(r["completion"][-1]["content"])
        else:
            return None
    return prompts, answers
