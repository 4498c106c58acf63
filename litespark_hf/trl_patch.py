"""`patch_trl`: TRL's (and transformers') trainer and config names bound to litespark_hf's subclasses, so that an
unchanged script or notebook gets the ``use_litespark`` flag (``--use_litespark`` on its command line).

What is rebound (module attributes only; the classes themselves are not modified):

- ``trl.SFTConfig``, ``trl.SFTTrainer``, ``trl.DPOConfig``, ``trl.DPOTrainer`` and the same names in ``trl.trainer``
  (``from trl import SFTTrainer``, ``from trl.trainer import SFTTrainer``);
- with ``transformers=True`` (the default): ``transformers.Trainer`` and ``transformers.TrainingArguments``
  (``from transformers import Trainer, TrainingArguments``).

The modules that define the stock classes (``trl.trainer.sft_trainer``, ``transformers.trainer``, ...) keep them:
litespark_hf's classes subclass those, and TRL's own subclasses (its experimental GKD/GOLD trainers) stay stock.
A name already imported before patching still holds the stock class; `patch_trl` warns for each such name it finds
in user code (``__main__`` and modules outside site-packages). With every flag at its default (``use_litespark``
False), the rebound classes behave exactly like the stock ones.
"""

from __future__ import annotations

import functools
import importlib
import sys
import sysconfig
import warnings
from pathlib import Path

_TRL_NAMES = ("SFTConfig", "SFTTrainer", "DPOConfig", "DPOTrainer")
_TRANSFORMERS_NAMES = ("Trainer", "TrainingArguments")

# (module name, attribute) -> the value it held before patch_trl rebound it
_saved: dict[tuple[str, str], object] = {}
_warned_stale: set[str] = set()


def _targets(transformers: bool) -> list[tuple[str, str]]:
    targets = [(module, name) for module in ("trl", "trl.trainer") for name in _TRL_NAMES]
    if transformers:
        targets += [("transformers", name) for name in _TRANSFORMERS_NAMES]
    return targets


def patch_trl(transformers: bool = True, warn_stale: bool = True) -> list[str]:
    """Bind ``trl.SFTConfig/SFTTrainer/DPOConfig/DPOTrainer`` (also in ``trl.trainer``) and, with
    ``transformers=True``, ``transformers.Trainer/TrainingArguments`` to litespark_hf's subclasses.

    Idempotent; `unpatch_trl` undoes it. A name that already holds some other replacement (another library's patch)
    is left alone, with a warning. Returns the rebound names (e.g. ``["trl.SFTTrainer", ...]``), the ones that were
    already rebound included.
    """
    from . import trainer as ours

    rebound = []
    for module_name, name in _targets(transformers):
        module = importlib.import_module(module_name)
        replacement, stock = getattr(ours, name), ours.STOCK_CLASSES[name]
        current = getattr(module, name)  # resolves TRL's / transformers' lazy attribute
        if current is not replacement:
            if current is not stock:
                warnings.warn(
                    f"litespark_hf.patch_trl: {module_name}.{name} is {_describe(current)}, not the stock class; "
                    "leaving it (litespark_hf's class is not put in its place).", UserWarning, stacklevel=2,
                )
                continue
            _saved[(module_name, name)] = current
            setattr(module, name, replacement)
        rebound.append(f"{module_name}.{name}")
    if warn_stale:
        stale = [name for name in _stale_imports([name for _, name in _targets(transformers)])
                 if name not in _warned_stale]
        if stale:
            _warned_stale.update(stale)
            warnings.warn(
                "litespark_hf.patch_trl: " + ", ".join(stale) + (" was" if len(stale) == 1 else " were")
                + " imported before patching and still hold the stock classes (a stock config has no use_litespark; "
                "a stock trainer applies only Litespark's model layers). Call litespark_hf.patch_trl() before "
                "importing them, or import them from litespark_hf.", UserWarning, stacklevel=2,
            )
    return rebound


def unpatch_trl() -> list[str]:
    """Put back what `patch_trl` replaced (a name someone rebound again since is left alone). Returns the names."""
    from . import trainer as ours

    restored = []
    for (module_name, name), original in list(_saved.items()):
        module = sys.modules.get(module_name)
        if module is not None and module.__dict__.get(name) is getattr(ours, name):
            setattr(module, name, original)
            restored.append(f"{module_name}.{name}")
        del _saved[(module_name, name)]
    return restored


def is_patched() -> bool:
    return bool(_saved)


def _describe(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[Path, ...]:
    """site-packages and the standard library: code that is not the user's."""
    paths = sysconfig.get_paths()
    dirs = {Path(paths[key]).resolve() for key in ("purelib", "platlib", "stdlib", "platstdlib") if key in paths}
    return tuple(dirs)


def _is_user_module(module_name: str, module) -> bool:
    if module_name == "__main__":
        return True
    top = module_name.partition(".")[0]
    if top in ("trl", "transformers", "litespark_hf", "litespark_kernels"):
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    try:
        path = Path(file).resolve()
    except (OSError, ValueError):
        return False
    return not any(path.is_relative_to(d) for d in _library_dirs())


def _stale_imports(names) -> list[str]:
    """``module.attr`` of user modules whose global holds one of the stock classes for ``names``."""
    from . import trainer as ours

    stock = {id(ours.STOCK_CLASSES[name]): name for name in names}
    found, seen = [], set()
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if id(module) in seen or not isinstance(namespace, dict) or not _is_user_module(module_name, module):
            continue
        seen.add(id(module))  # __main__ is also __mp_main__
        for attr, value in list(namespace.items()):
            if id(value) in stock and not attr.startswith("_"):
                found.append(f"{module_name}.{attr}")
    return sorted(set(found))
