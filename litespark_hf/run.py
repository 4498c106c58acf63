"""``litespark-run`` / ``python -m litespark_hf.run``: run an unchanged TRL or transformers training script with
litespark_hf's trainer and config classes in place of TRL's (`litespark_hf.patch_trl`), so that it accepts
``--use_litespark`` (and ``--litespark_config JSON``).

    litespark-run sft --model_name_or_path M --dataset_name D --output_dir out --use_litespark
    python -m litespark_hf.run my_script.py --use_litespark ...
    python -m litespark_hf.run -m trl.scripts.dpo --use_litespark ...
    accelerate launch --num_processes 2 -m litespark_hf.run sft ... --use_litespark

Run ``litespark-run --help`` for the options.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys

TRL_SCRIPTS = {"sft": "trl.scripts.sft", "dpo": "trl.scripts.dpo"}
_OTHER_TRL_SCRIPTS = ("grpo", "kto", "reward", "rloo", "distillation")

USAGE = """\
usage: litespark-run [-h] [--no-transformers] [--quiet] TARGET [ARG ...]
       python -m litespark_hf.run [...]
       accelerate launch [ACCELERATE OPTIONS] -m litespark_hf.run [...]

Run a training script with TRL's trainer and config classes (trl.SFTConfig, SFTTrainer, DPOConfig, DPOTrainer, also
in trl.trainer) and transformers' Trainer and TrainingArguments bound to litespark_hf's subclasses, so that the
unchanged script accepts --use_litespark [--litespark_config JSON]. Without --use_litespark it trains stock.

TARGET (everything after it goes to the script, its own --help included):
  sft, dpo            TRL's own scripts (what `trl sft` / `trl dpo` run), in this process; for several GPUs
                      put `accelerate launch [options] -m litespark_hf.run` in front instead of `trl`
  -m MODULE           a module, as `python -m MODULE` (e.g. -m trl.scripts.sft)
  PATH                a script file, as `python PATH`

options (before TARGET):
  -h, --help          show this help and exit
  --no-transformers   leave transformers.Trainer / TrainingArguments stock (only TRL's names are rebound)
  --quiet             do not log what Litespark patched and swapped (INFO lines on stderr otherwise)

examples:
  litespark-run sft --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara \\
      --output_dir out --use_litespark
  accelerate launch --num_processes 8 -m litespark_hf.run dpo --config dpo.yaml --use_litespark
  python -m litespark_hf.run train.py --use_litespark --litespark_config '{"fused_cross_entropy": false}'
"""


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[dict, str, str, list[str]]:
    """``argv`` -> (options, kind, target, script arguments); kind is ``"module"`` or ``"path"``."""
    options = {"transformers": True, "quiet": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            options["help"] = True
            return options, "", "", []
        if arg == "--no-transformers":
            options["transformers"] = False
        elif arg == "--quiet":
            options["quiet"] = True
        elif arg == "-m":
            if i + 1 >= len(argv):
                raise UsageError("-m needs a module name")
            return options, "module", argv[i + 1], argv[i + 2:]
        elif arg.startswith("-m") and len(arg) > 2:  # -mMODULE, as python takes it
            return options, "module", arg[2:], argv[i + 1:]
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r} before the script (options of the script go after it)")
        elif arg in TRL_SCRIPTS:
            return options, "module", TRL_SCRIPTS[arg], argv[i + 1:]
        elif arg in _OTHER_TRL_SCRIPTS and not os.path.exists(arg):
            raise UsageError(
                f"litespark_hf has trainer classes for TRL's {' and '.join(TRL_SCRIPTS)} scripts, not {arg!r}; "
                f"run that script stock (trl {arg} ...)"
            )
        elif os.path.exists(arg):
            return options, "path", arg, argv[i + 1:]
        else:
            raise UsageError(f"{arg!r} is neither {', '.join(TRL_SCRIPTS)}, -m MODULE, nor an existing script file")
        i += 1
    raise UsageError("no script given")


def _log_to_stderr() -> None:
    log = logging.getLogger("litespark_hf")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options, kind, target, script_args = parse(argv)
    except UsageError as exc:
        print(f"litespark-run: {exc}\n\n{USAGE}", file=sys.stderr)
        return 2
    if options.get("help"):
        print(USAGE)
        return 0

    from .trl_patch import patch_trl

    log = logging.getLogger("litespark_hf.run")
    if not options["quiet"]:
        _log_to_stderr()
    rebound = patch_trl(transformers=options["transformers"], warn_stale=False)
    log.info("litespark-run: patched %s -> litespark_hf's classes; running %s%s", ", ".join(rebound),
             "-m " if kind == "module" else "", target)
    if not any(a == "--use_litespark" or a.startswith("--use_litespark=") for a in script_args) \
            and "--config" not in script_args:
        log.warning("litespark-run: --use_litespark is not among the script's arguments: it trains without "
                    "Litespark")

    if kind == "module":
        sys.argv = [target, *script_args]  # runpy puts the module's file in argv[0]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        path = os.path.abspath(target)
        sys.argv = [target, *script_args]
        sys.path.insert(0, os.path.dirname(path))  # as `python PATH` does
        runpy.run_path(path, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
