"""The embedded tokenizer: a byte-level BPE trained offline, in seconds, on the embedded corpus.

Saved as a normal Hugging Face tokenizer (``PreTrainedTokenizerFast``: ``AutoTokenizer.from_pretrained(path)`` loads
it) with ``bos``/``eos``/``pad`` tokens and a small chat template. Digits are split one per token (arithmetic is
then learnable by a tiny model). Cached under ``$LITESPARK_CACHE`` (default ``~/.cache/litespark_hf``), keyed by the
Python version, the vocabulary size and the training sample, so every later run loads it in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .corpus import iter_documents

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# One turn: <|role|>content<|end|>. The assistant's content and its <|end|> sit inside {% generation %} so that
# TRL's assistant_only_loss trains the model to stop. The bos token opens the conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 2048
DEFAULT_TRAIN_CHARS = 3_000_000


def cache_root() -> Path:
    return Path(os.environ.get("LITESPARK_CACHE", Path.home() / ".cache" / "litespark_hf"))


def _cache_key(vocab_size: int, train_chars: int) -> str:
    spec = {"v": 1, "python": sys.version.split()[0], "vocab": vocab_size, "chars": train_chars,
            "template": CHAT_TEMPLATE, "special": SPECIAL_TOKENS}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, train_chars: int = DEFAULT_TRAIN_CHARS):
    """Train the byte-level BPE on the first ``train_chars`` characters of the corpus's train split (no caching)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    texts = (d["text"] for d in iter_documents("train", max_chars=train_chars))
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                     additional_special_tokens=ROLE_TOKENS, model_max_length=4096,
                                     clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def embedded_tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE, train_chars: int = DEFAULT_TRAIN_CHARS) -> Path:
    """Directory of the cached embedded tokenizer, training and saving it first if needed (atomic: safe when
    several processes race; the first finished one wins)."""
    path = cache_root() / f"tokenizer-v{vocab_size}-{_cache_key(vocab_size, train_chars)}"
    if (path / "tokenizer.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        train_tokenizer(vocab_size, train_chars).save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            if not (path / "tokenizer.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_embedded_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, train_chars: int = DEFAULT_TRAIN_CHARS):
    """The embedded tokenizer (a ``PreTrainedTokenizerFast``), trained on first use and cached."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_tokenizer_path(vocab_size, train_chars))
