"""Synthetic post-training data for `litespark_hf.efficiency.post_bench`: variable-length conversations, fixed seed.

Lengths (tokens, special tokens included), drawn independently per row with numpy's ``default_rng(seed)``:

- prompt: log-normal, median ``128 * max_length / 2048``, sigma 1.0, at least 8 tokens (2 on tiny configs), at most
  ``max_length - min_completion``; it starts with the BOS id;
- completion (SFT answer; DPO chosen and rejected, drawn independently): log-normal, median
  ``384 * max_length / 2048``, sigma 1.0, at least 4 tokens (2 on tiny configs), then clipped to
  ``max_length - prompt`` (a long answer runs to the maximum length); it ends with the EOS id. A rejected completion
  of the same length as its chosen one is made one token shorter (or longer, where the room allows), so pairs differ.

At ``max_length=2048`` this gives, for the total ``prompt + completion`` (20,000 draws): median ~590, p90 ~1,680,
max 2,048 (about 6.5% of the rows reach it), min ~40, mean ~760; completions are ~73% of the tokens; batches of 4
rows padded to their longest row are ~44% padding (DPO: batches of 2 pairs, i.e. 4 sequences, ~43%). There are no
constant-length rows. The
figures of the pool actually used are computed by `length_stats` and written in the benchmark's JSON.

Token ids are uniform over ``[FIRST_CONTENT_ID, vocab_size)``: they avoid the special ids ``PAD=0, BOS=1, EOS=2,
UNK=3``. The pool (its size follows from the steps, so that packing gets as many full blocks as it needs) is a pure
function of ``(kind, max_length, vocab_size, seed, rows)``: every variant of a mode trains on the same rows.

Formats, as TRL 1.16 takes them:

- SFT: pre-tokenized ``input_ids`` + ``completion_mask`` columns (no tokenizer round-trip; TRL builds the labels from
  the mask when ``completion_only_loss=True``, its default for prompt-completion data);
- DPO: TRL 1.16's `DPOTrainer` tokenizes its dataset itself (no pre-tokenized path), so the rows are ``prompt`` /
  ``chosen`` / ``rejected`` strings in which each token is written ``<id>``, and `id_tokenizer` maps every ``<id>``
  back to its id exactly (a word-level tokenizer over the whole vocabulary, no merges, no added specials): the ids TRL
  trains on are the generated ones (checked in the tests). The completions already end with EOS, so TRL's ``add_eos``
  step leaves them as they are.
"""

from __future__ import annotations

import math

__all__ = ["PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "FIRST_CONTENT_ID", "length_spec", "sft_rows", "dpo_rows",
           "sft_pool_rows", "id_tokenizer", "ids_to_text", "length_stats"]

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FIRST_CONTENT_ID = 4

# Medians at max_length 2048 (scaled linearly with max_length), log-normal sigmas.
PROMPT_MEDIAN_2048, PROMPT_SIGMA = 128, 1.0
COMPLETION_MEDIAN_2048, COMPLETION_SIGMA = 384, 1.0


def length_spec(max_length: int) -> dict:
    """The length distribution's parameters at ``max_length``."""
    scale = max_length / 2048
    small = max_length < 512
    return {
        "distribution": "log-normal lengths per row, prompt and completion independent; completion clipped to "
                        "max_length - prompt",
        "max_length": int(max_length),
        "prompt_median": max(2.0, PROMPT_MEDIAN_2048 * scale), "prompt_sigma": PROMPT_SIGMA,
        "completion_median": max(2.0, COMPLETION_MEDIAN_2048 * scale), "completion_sigma": COMPLETION_SIGMA,
        "min_prompt": 2 if small else 8, "min_completion": 2 if small else 4,
        "special_ids": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
        "content_ids": f"uniform over [{FIRST_CONTENT_ID}, vocab_size)",
    }


def _lengths(rng, n: int, spec: dict, pairs: bool):
    import numpy as np

    m = spec["max_length"]
    p = np.rint(rng.lognormal(math.log(spec["prompt_median"]), spec["prompt_sigma"], n)).astype(np.int64)
    p = np.clip(p, spec["min_prompt"], m - spec["min_completion"])
    outs = []
    for _ in range(2 if pairs else 1):
        c = np.rint(rng.lognormal(math.log(spec["completion_median"]), spec["completion_sigma"], n)).astype(np.int64)
        outs.append(np.clip(c, spec["min_completion"], m - p))
    if pairs:  # chosen and rejected of different lengths
        c, r = outs
        same = c == r
        r = np.where(same & (r > spec["min_completion"]), r - 1, np.where(same, r + 1, r))
        outs = [c, np.clip(r, spec["min_completion"], m - p)]
    return p, outs


def _tokens(rng, n: int, vocab: int, first: int | None = None, last: int | None = None) -> list[int]:
    ids = rng.integers(FIRST_CONTENT_ID, vocab, size=n).tolist()
    if first is not None:
        ids[0] = first
    if last is not None:
        ids[-1] = last
    return ids


def sft_pool_rows(batch: int, steps: int, max_length: int, packing_fill: float = 1.25) -> int:
    """Rows of the SFT pool: enough for ``steps`` batches of ``batch`` rows, and for packing (batches of ``batch``
    blocks of ``max_length`` tokens) ``packing_fill`` times the tokens it needs at the unclipped distribution's mean
    length (the clipping shortens the mean by ~10%, so the pool holds ~1.1x what packing needs)."""
    spec = length_spec(max_length)
    mean = (spec["prompt_median"] * math.exp(spec["prompt_sigma"] ** 2 / 2)
            + spec["completion_median"] * math.exp(spec["completion_sigma"] ** 2 / 2))
    mean = min(mean, 0.9 * max_length)  # the clipping shortens the tail; keep the estimate on the generous side
    return max(batch * steps, math.ceil(packing_fill * batch * steps * max_length / mean) + batch)


def sft_rows(n: int, max_length: int, vocab_size: int, seed: int) -> list[dict]:
    """``n`` prompt-completion rows: ``input_ids`` (BOS prompt ... completion EOS), ``completion_mask`` (0 on the
    prompt, 1 on the completion), plus their ``prompt_length`` / ``completion_length``."""
    import numpy as np

    spec = length_spec(max_length)
    rng = np.random.default_rng([seed, 0x5F7])
    p, (c,) = _lengths(rng, n, spec, pairs=False)
    rows = []
    for i in range(n):
        ids = _tokens(rng, int(p[i]) + int(c[i]), vocab_size, first=BOS_ID, last=EOS_ID)
        rows.append({"input_ids": ids, "completion_mask": [0] * int(p[i]) + [1] * int(c[i]),
                     "prompt_length": int(p[i]), "completion_length": int(c[i])})
    return rows


def ids_to_text(ids) -> str:
    """Token ids as the text `id_tokenizer` reads back exactly: ``<5><17>...``."""
    return "".join(f"<{int(i)}>" for i in ids)


def dpo_rows(n: int, max_length: int, vocab_size: int, seed: int) -> list[dict]:
    """``n`` preference pairs: a shared ``prompt`` (BOS first), ``chosen`` and ``rejected`` completions of different
    lengths (EOS last), as `id_tokenizer` text, and the same as ids (``*_ids``, for checks and statistics)."""
    import numpy as np

    spec = length_spec(max_length)
    rng = np.random.default_rng([seed, 0xD90])
    p, (c, r) = _lengths(rng, n, spec, pairs=True)
    rows = []
    for i in range(n):
        prompt = _tokens(rng, int(p[i]), vocab_size, first=BOS_ID)
        chosen = _tokens(rng, int(c[i]), vocab_size, last=EOS_ID)
        rejected = _tokens(rng, int(r[i]), vocab_size, last=EOS_ID)
        rows.append({"prompt": ids_to_text(prompt), "chosen": ids_to_text(chosen), "rejected": ids_to_text(rejected),
                     "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def id_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast` whose token ``<i>`` is id ``i`` for every id of the vocabulary (word level, split
    on ``<digits>``), with ``pad=<0>``, ``bos=<1>``, ``eos=<2>``, ``unk=<3>``; it adds no special tokens itself."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token=f"<{UNK_ID}>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\d+>"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"<{PAD_ID}>", bos_token=f"<{BOS_ID}>",
                                   eos_token=f"<{EOS_ID}>", unk_token=f"<{UNK_ID}>", model_max_length=10 ** 9)


def length_stats(lengths, batch: int | None = None) -> dict:
    """Median, p90, max, min, mean and standard deviation of ``lengths``; with ``batch``, the padding fraction of
    consecutive groups of ``batch`` sequences, each padded to its longest (``1 - real / padded`` tokens)."""
    import numpy as np

    a = np.asarray(list(lengths), dtype=np.int64)
    out = {"count": int(a.size), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
           "max": int(a.max()), "min": int(a.min()), "mean": float(a.mean()), "std": float(a.std()),
           "distinct": int(np.unique(a).size)}
    if batch:
        k = a.size // batch * batch
        if k:
            g = a[:k].reshape(-1, batch)
            out[f"padding_fraction_batch{batch}"] = float(1.0 - g.sum() / (batch * g.max(axis=1)).sum())
    return out
