"""Datasets of the recipes: the offline embedded default, local files (.jsonl/.json/.parquet/.txt/.csv, a directory or
a glob) or a Hub dataset, a held-out split, and the column checks."""

from __future__ import annotations

import difflib
import glob
import json
import os
from pathlib import Path

from .args import EMBEDDED
from .errors import RecipeError

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def is_embedded(name: str | None) -> bool:
    return name is None or name.strip() in ("", EMBEDDED)


def looks_local(name: str) -> bool:
    """A name that can only be a local path (a Hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def local_files(name: str) -> list[str] | None:
    """The data files named by a local path, directory or glob, or None when ``name`` is not local."""
    name = os.path.expanduser(name)
    if os.path.isdir(name):
        files = sorted(p for p in glob.glob(os.path.join(name, "**", "*"), recursive=True)
                       if Path(p).suffix in LOCAL_EXTENSIONS and os.path.isfile(p))
        if not files:
            raise RecipeError(f"directory {name} holds no data files ({', '.join(LOCAL_EXTENSIONS)})")
        return files
    if any(c in name for c in "*?["):
        files = sorted(glob.glob(name, recursive=True))
        if not files:
            raise RecipeError(f"no file matches {name}")
        return files
    if os.path.isfile(name):
        return [name]
    if Path(name).suffix in LOCAL_EXTENSIONS or looks_local(name):
        raise RecipeError(f"dataset file {name} does not exist; give an existing path, or unset dataset_name for "
                          "the embedded default")
    return None


def _builder(files: list[str], name: str) -> str:
    exts = {Path(f).suffix for f in files}
    unknown = sorted(e or "(no extension)" for e in exts if e not in LOCAL_EXTENSIONS)
    if unknown:
        raise RecipeError(f"dataset {name}: cannot read {unknown[0]} files; give {', '.join(LOCAL_EXTENSIONS)} files")
    if len(exts) > 1:
        raise RecipeError(f"dataset {name} mixes file types {sorted(exts)}; give files of one type")
    return LOCAL_EXTENSIONS[exts.pop()]


def diagnose_json_files(files: list[str]) -> None:
    """Raise one RecipeError naming the file, line and cause of the first unreadable row of .jsonl / .json files
    (called when the datasets library failed to read them, so that its error is not the user's only clue)."""
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                if path.endswith(".json"):
                    text = f.read()
                    if not text.strip():
                        raise RecipeError(f"dataset file {path} is empty (no rows)")
                    try:
                        data = json.loads(text)
                    except json.JSONDecodeError:  # a .json file may also hold one object per line
                        data = None
                    if data is not None:
                        if not isinstance(data, (list, dict)):
                            raise RecipeError(f"dataset file {path} holds a JSON {type(data).__name__}; give a list "
                                              "of row objects, or one object per line")
                        continue
                    f.seek(0)
                n_rows = 0
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RecipeError(f"dataset file {path} line {n} is not valid JSON ({e.msg}, column {e.colno})"
                                          "; fix or remove that line (one JSON object per line)") from e
                    if not isinstance(row, dict):
                        raise RecipeError(f"dataset file {path} line {n} holds a JSON {type(row).__name__}, not an "
                                          "object (one JSON object per line, e.g. {\"text\": \"...\"})")
                    n_rows += 1
                if n_rows == 0:
                    raise RecipeError(f"dataset file {path} is empty (no rows)")
        except UnicodeDecodeError as e:
            raise RecipeError(f"dataset file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
        except OSError as e:
            raise RecipeError(f"cannot read dataset file {path}: {e.strerror or e}") from e


def _read_local(files: list[str], name: str, streaming: bool):
    import datasets

    builder = _builder(files, name)
    for path in files:
        if not os.access(path, os.R_OK):
            raise RecipeError(f"cannot read dataset file {path}: permission denied")
        if builder != "text" and os.path.getsize(path) == 0:
            raise RecipeError(f"dataset file {path} is empty (no rows)")
    # .txt: one document per file; a single file is split into documents at blank lines (paragraphs)
    kwargs = {"sample_by": "document" if len(files) > 1 else "paragraph"} if builder == "text" else {}
    verbosity = datasets.utils.logging.get_verbosity()
    try:
        # its own failure log lines would come before ours; the error says it
        datasets.utils.logging.set_verbosity(max(verbosity, datasets.utils.logging.ERROR))
        return datasets.load_dataset(builder, data_files={"train": files}, streaming=streaming, **kwargs)
    except Exception as e:  # noqa: BLE001 - turned into one message
        if builder == "json":
            diagnose_json_files(files)
        cause = " ".join(str(getattr(e, "__cause__", None) or e).split())[:300]
        raise RecipeError(f"cannot read dataset files {files[:3]}{'...' if len(files) > 3 else ''} as "
                          f"{builder}: {cause or type(e).__name__}") from e
    finally:
        datasets.utils.logging.set_verbosity(verbosity)


def _n_rows(ds):
    try:
        return len(ds)
    except TypeError:  # streaming
        return None


def load_any_dataset(data_args, embedded_fn, seed: int = 42, text_field: str = "text"):
    """``(train, test_or_None, source)`` from the embedded default, local files or the Hub.

    Offline (``HF_HUB_OFFLINE=1``), a Hub dataset that is not in the local cache fails with one message.
    """
    import datasets

    name = data_args.dataset_name
    if is_embedded(name):
        dd = embedded_fn()
        return _cap(dd["train"], data_args.max_train_samples), _cap(dd["test"], data_args.max_eval_samples), EMBEDDED
    files = local_files(name)
    if files is not None:
        dd = _read_local(files, name, data_args.dataset_streaming)
        if "text" in column_names(dd["train"]) and _builder(files, name) == "text" and text_field != "text":
            dd = dd.rename_column("text", text_field)
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
            raise RecipeError(f"cannot load dataset '{name}': {' '.join(str(e).split())[:300]}") from e
    if data_args.dataset_train_split not in dd:
        raise RecipeError(f"dataset {name} has no split '{data_args.dataset_train_split}' (splits: {list(dd)}); "
                          "set dataset_train_split")
    train = dd[data_args.dataset_train_split]
    if _n_rows(train) == 0:
        raise RecipeError(f"dataset {name} has no rows in split '{data_args.dataset_train_split}'")
    test = dd[data_args.dataset_test_split] if data_args.dataset_test_split in dd else None
    if test is None and data_args.eval_fraction > 0:
        if data_args.dataset_streaming:
            n_eval = data_args.max_eval_samples or 200
            test, train = train.take(n_eval), train.skip(n_eval)
            if next(iter(train), None) is None:
                raise RecipeError(f"dataset {name}: the stream has no rows left for training after the first {n_eval} "
                                  "held out; lower --max_eval_samples, or do not stream a dataset this small")
        else:
            n = len(train)
            if n < 2:
                raise RecipeError(f"dataset {name} has {n} row{'s' if n != 1 else ''}: too few to hold out "
                                  f"eval_fraction {data_args.eval_fraction} of them; give more rows, a "
                                  f"'{data_args.dataset_test_split}' split, or --eval_fraction 0 (no held-out split)")
            split = train.train_test_split(test_size=data_args.eval_fraction, seed=seed)
            train, test = split["train"], split["test"]
    return _cap(train, data_args.max_train_samples), _cap(test, data_args.max_eval_samples), name


def _cap(ds, n):
    if ds is None or n is None:
        return ds
    if hasattr(ds, "select"):
        return ds.select(range(min(n, len(ds))))
    return ds.take(n)


def column_names(ds) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is None:  # streaming dataset without known features: peek at one row
        try:
            names = list(next(iter(ds)).keys())
        except StopIteration:
            raise RecipeError("the dataset stream has no rows") from None
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


def describe_source(name: str) -> dict:
    """What the model card says about a data source: ``{"kind": "embedded"|"local"|"hub", "name", "files"}``."""
    if is_embedded(name):
        return {"kind": "embedded", "name": EMBEDDED}
    try:
        files = local_files(name)
    except RecipeError:
        files = None
    if files is not None:
        return {"kind": "local", "name": name, "files": [os.path.basename(f) for f in files]}
    return {"kind": "hub", "name": name}
