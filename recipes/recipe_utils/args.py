"""Arguments of the recipes: the shared dataset arguments, `parse_args` (TrlParser with a checked YAML config and
one-line errors), the training defaults and the range checks of numeric flags."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field

import torch

from .errors import RecipeError

EMBEDDED = "embedded"


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
                                                                   "split (0 = no held-out split)."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset (Hub or local files; needs "
                                                                      "max_steps > 0)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N held-out rows."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an output_dir that holds another run of a recipe (never a directory with "
                          "other files). The earlier run is kept until the new one has trained its first step."},
    )


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_defaults(output_dir: str) -> dict:
    """Defaults of every recipe (a YAML config or the command line overrides them). Litespark is on unless
    ``--use_litespark false`` (the library's own default stays off)."""
    return dict(
        output_dir=output_dir, bf16=bf16_supported(), fp16=False, use_cpu=cpu_only(), report_to="none",
        lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=10,
        eval_strategy="steps", eval_steps=100, save_strategy="steps", save_steps=100, save_total_limit=2,
        dataloader_num_workers=0, seed=42, use_litespark=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------
def _all_fields(dataclass_types) -> set[str]:
    return {f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init}


def _script(recipe: str | None) -> str:
    return f"recipes/{recipe}.py" if recipe else (sys.argv[0] or "the recipe")


def _raise_parse_error(message: str):
    raise RecipeError(message)


def _escape_help(parser) -> None:
    """argparse %-formats help strings: a bare '%' (e.g. 'held-out files, %') crashes ``--help``."""
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"(?<!%)%(?![(%])", "%%", action.help)


def _read_config(argv: list[str], known: set[str], recipe: str | None) -> dict:
    """The YAML of ``--config PATH`` (checked: a mapping whose keys are arguments), or {}."""
    import yaml

    if "--config" not in argv:
        return {}
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise RecipeError("--config needs a YAML file path, e.g. --config recipes/configs/pretrain_tiny.yaml")
    path = argv[i + 1]
    if not os.path.isfile(path):
        raise RecipeError(f"config file {path} does not exist; pass a YAML file such as "
                          "recipes/configs/pretrain_tiny.yaml")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" line {where.line + 1}" if where is not None else ""
        raise RecipeError(f"config file {path}{at} is not valid YAML ({getattr(e, 'problem', None) or e})") from e
    if not isinstance(config, dict):
        raise RecipeError(f"config file {path} must hold a YAML mapping of argument: value")
    unknown = [k for k in config if k not in known | {"env"}]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), sorted(known), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise RecipeError(f"config file {path}: {', '.join(hints)} match no argument of this recipe; fix or "
                          f"remove {'them' if len(unknown) > 1 else 'it'} (python {_script(recipe)} --help lists the "
                          "arguments)")
    return config


def _check_unknown_flags(parser, argv: list[str], recipe: str | None) -> None:
    """An unknown flag (or a stray value) is one line naming the closest flag. ``--help`` prints and exits here."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        del argv[i:i + 2]
    _, rest = parser.parse_known_args(argv)
    if not rest:
        return
    options = sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        flag = flags[0].split("=", 1)[0]
        close = difflib.get_close_matches(flag, options, n=1)
        raise RecipeError(f"unknown argument {flag}" + (f" (did you mean {close[0]}?)" if close else "")
                          + f"; python {_script(recipe)} --help lists the arguments")
    raise RecipeError(f"unexpected argument '{rest[0]}' (every value follows its --flag); python {_script(recipe)} "
                      "--help lists the arguments")


def check_litespark_config(value, where: str = "--litespark_config") -> None:
    """A `LitesparkConfig` given as JSON (or a YAML mapping): valid JSON, known keys, or one line saying what to fix."""
    from litespark_hf import LitesparkConfig

    if value is None or (isinstance(value, str) and not value.strip()):
        return
    example = '\'{"fused_cross_entropy": false}\''
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where} is not valid JSON ({e.msg} at character {e.pos + 1}); give a JSON object "
                              f"such as {example}") from e
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a JSON object such as {example}, not {type(value).__name__}")
    known = sorted(f.name for f in dataclasses.fields(LitesparkConfig))
    unknown = [k for k in value if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise RecipeError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; known keys: "
                          f"{', '.join(known)}")
    try:
        LitesparkConfig.from_any(value)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from e


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def parse_args(dataclass_types, argv=None, defaults: dict | None = None, recipe: str | None = None):
    """`TrlParser(...).parse_args_and_config()` with recipe defaults (a YAML ``--config`` and the command line
    override them), one-line errors (`RecipeError`) for an unknown flag, a bad value, a YAML key that matches no
    argument or a bad ``--litespark_config``, and the range checks of `check_numbers`."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    dataclass_types = (*dataclass_types, litespark_options_class())
    parser = TrlParser(dataclass_types, prog=_script(recipe) if recipe else None)
    parser.error = _raise_parse_error  # argparse's usage + message + exit becomes one RecipeError line
    _escape_help(parser)
    if defaults:
        parser.set_defaults(**defaults)
    config = _read_config(argv, _all_fields(dataclass_types), recipe)
    _check_unknown_flags(parser, argv, recipe)
    cli = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    cli.add_argument("--litespark_config")
    cli_value = cli.parse_known_args(argv)[0].litespark_config
    if cli_value is not None:
        check_litespark_config(cli_value)
    elif "litespark_config" in config:
        check_litespark_config(config["litespark_config"], "litespark_config (config file)")
    try:
        *parsed, options = parser.parse_args_and_config(args=argv)
    except RecipeError:
        raise
    except (ValueError, TypeError) as e:  # the argument classes' own checks (__post_init__)
        raise RecipeError(_one_line(e)) from e
    if isinstance(parsed[1].litespark_config, dict):
        parsed[1].litespark_config = json.dumps(parsed[1].litespark_config)
    litespark_config_from(parsed[1], options)
    check_numbers(parsed[0], parsed[1])
    check_report_to(parsed[1])
    return (*parsed, options)


def check_report_to(training_args) -> None:
    """``--report_to wandb`` without wandb installed fails inside the trainer's constructor; say it here."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = training_args.report_to or []
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    available = get_available_reporting_integrations()
    missing = [r for r in wanted if r not in ("none", "all") and r not in available]
    if missing:
        raise RecipeError(f"--report_to {' '.join(missing)}: not installed in this environment (pip install "
                          f"{' '.join(missing)}); installed: {', '.join(available) or 'none'}; or --report_to none")


# --------------------------------------------------------------------------------------------------------------------
# LitesparkConfig flags
# --------------------------------------------------------------------------------------------------------------------
def litespark_options_class():
    from litespark_hf import LitesparkConfig

    @dataclass
    class RecipeOptions(LitesparkConfig):
        """Efficiency tracking, plus every `LitesparkConfig` option (``--sat_omission_rate_mlp 0.5``, ...) as a flag.

        The LitesparkConfig flags take effect with Litespark on (the default; ``--use_litespark false`` turns it
        off); set ones override ``--litespark_config``.
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

    given_config = getattr(training_args, "litespark_config", None)
    base = LitesparkConfig.from_any(given_config).to_dict()
    defaults = LitesparkConfig().to_dict()
    changed = {k: getattr(options, k) for k in defaults if getattr(options, k) != defaults[k]}
    if changed:
        training_args.litespark_config = json.dumps({**base, **changed})
    merged = LitesparkConfig.from_any(training_args.litespark_config)
    if merged.compile_layers and getattr(training_args, "torch_compile", False):
        raise RecipeError("--compile_layers true compiles each decoder layer and --torch_compile true the whole "
                          "model: use one of them")
    if not training_args.use_litespark:
        given = [f"--{k}" for k in changed] + (["--litespark_config"] if given_config else [])
        if given:
            raise RecipeError(f"{', '.join(given)} need Litespark, which --use_litespark false turns off; drop "
                              f"{'them' if len(given) > 1 else 'it'} or --use_litespark false")


# --------------------------------------------------------------------------------------------------------------------
# Range checks (the Trainer accepts these values and silently trains something else)
# --------------------------------------------------------------------------------------------------------------------
def require(ok: bool, flag: str, value, want: str) -> None:
    """``error: --flag value: want`` unless ``ok``."""
    if not ok:
        raise RecipeError(f"--{flag} {value}: {want}")


def require_min(obj, names, minimum, want: str | None = None, optional: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None and optional:
            continue
        require(v is not None and v >= minimum, name, v, want or f"must be at least {minimum}")


def check_numbers(script_args, training_args) -> None:
    """Numeric flags shared by the recipes, checked before anything is loaded or written."""
    t = training_args
    require(t.max_steps == -1 or t.max_steps > 0, "max_steps", t.max_steps,
            "give a positive number of optimizer steps, or -1 to train for --num_train_epochs")
    if t.max_steps == -1:
        require(t.num_train_epochs > 0, "num_train_epochs", t.num_train_epochs,
                "must be > 0 (or set --max_steps to a positive number of steps)")
    require_min(t, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"), 1)
    require_min(t, ("learning_rate", "weight_decay", "warmup_steps"), 0, "must not be negative")
    require(t.max_grad_norm is None or t.max_grad_norm >= 0, "max_grad_norm", t.max_grad_norm,
            "must not be negative (0 = no clipping)")
    for name, strategy in (("logging_steps", "logging_strategy"), ("eval_steps", "eval_strategy"),
                           ("save_steps", "save_strategy")):
        v, every = getattr(t, name, None), getattr(getattr(t, strategy, None), "value", getattr(t, strategy, None))
        require(v is None or every != "steps" or v > 0, name, v,
                "must be > 0 (a number of steps, or a fraction of training below 1)")
    max_length = getattr(t, "max_length", None)
    require(max_length is None or max_length >= 2, "max_length", max_length,
            "must be at least 2 tokens (a model learns to predict each token from the ones before it)")
    s = script_args
    require(0 <= s.eval_fraction < 1, "eval_fraction", s.eval_fraction,
            "must be in [0, 1): the fraction of rows held out (0 = no held-out split)")
    require(s.max_train_samples is None or s.max_train_samples >= 1, "max_train_samples", s.max_train_samples,
            "must be at least 1 (unset = all rows)")
    require(s.max_eval_samples is None or s.max_eval_samples >= 1, "max_eval_samples", s.max_eval_samples,
            "must be at least 1 (unset = all held-out rows; --eval_strategy no turns evaluation off)")
    if s.dataset_streaming and t.max_steps <= 0:
        raise RecipeError("dataset_streaming needs max_steps > 0 (a stream has no length)")
