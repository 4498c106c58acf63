"""The embedded pre-training corpus: the Python standard library's own source files.

Present on every machine that runs Python, read at run time (nothing is downloaded or shipped): real code, which
also suits StarCoder2-style code models. Files are listed in a deterministic order (sorted by a hash of their path
relative to the stdlib root, which mixes packages) and split into train / held-out by a second, independent hash
of that path, so the split is the same on every run and every process.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class CorpusFile:
    relpath: str
    path: Path

    @property
    def order_key(self) -> int:
        return _hash("order:" + self.relpath)

    def is_heldout(self, heldout_percent: float) -> bool:
        return (_hash("split:" + self.relpath) % 10_000) < heldout_percent * 100


def list_files(root: Path | None = None) -> list[CorpusFile]:
    """Every ``.py`` file under the stdlib (site-packages excluded), in the corpus's deterministic order."""
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                files.append(CorpusFile(path.relative_to(root).as_posix(), path))
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library directory {root}")
    return sorted(files, key=lambda f: (f.order_key, f.relpath))


def read_text(path: Path) -> str | None:
    """UTF-8 text of a file, or None for files that are not UTF-8 (a few test files are deliberately not)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def iter_documents(split: str = "train", heldout_percent: float = 2.0, max_chars: int | None = None,
                   root: Path | None = None):
    """Yield ``{"text", "path"}`` documents of one split (``"train"`` or ``"test"``), in corpus order.

    ``max_chars`` stops after that many characters (the last document is kept whole), for quick runs.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    want_heldout = split == "test"
    total = 0
    for f in list_files(root):
        if f.is_heldout(heldout_percent) != want_heldout:
            continue
        text = read_text(f.path)
        if text is None:
            continue
        yield {"text": text, "path": f.relpath}
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def load_corpus(heldout_percent: float = 2.0, max_train_chars: int | None = None,
                max_eval_chars: int | None = None, root: Path | None = None):
    """The corpus as a ``datasets.DatasetDict`` with ``train`` and ``test`` splits (columns ``text``, ``path``)."""
    import datasets

    def build(split, max_chars):
        docs = list(iter_documents(split, heldout_percent, max_chars, root))
        return datasets.Dataset.from_dict({"text": [d["text"] for d in docs], "path": [d["path"] for d in docs]})

    return datasets.DatasetDict({"train": build("train", max_train_chars), "test": build("test", max_eval_chars)})
