"""The embedded default: everything the recipes need to train with no network, no Hub and no downloads.

- `load_corpus`: the Python standard library's own ``.py`` files, read at run time, train / held-out split.
- `load_embedded_tokenizer` / `embedded_tokenizer_path`: a byte-level BPE trained offline on that corpus (cached).
- `sft_dataset` / `dpo_dataset`: generated instruction and preference sets with verifiable answers.
"""

from .corpus import iter_documents, list_files, load_corpus, stdlib_root
from .tasks import TASKS, dpo_dataset, sft_dataset
from .tokenizer import (BOS, CHAT_TEMPLATE, DEFAULT_VOCAB_SIZE, EOS, PAD, embedded_tokenizer_path,
                        load_embedded_tokenizer, train_tokenizer)

__all__ = [
    "BOS", "CHAT_TEMPLATE", "DEFAULT_VOCAB_SIZE", "EOS", "PAD", "TASKS", "dpo_dataset", "embedded_tokenizer_path",
    "iter_documents", "list_files", "load_corpus", "load_embedded_tokenizer", "sft_dataset", "stdlib_root",
    "train_tokenizer",
]
