"""Generated instruction (SFT) and preference (DPO) sets with verifiable answers, deterministic by seed.

Small tasks a tiny model can learn in minutes, each with one exact answer: addition, the larger of two numbers,
the successor of a number, repeating two words. SFT rows are conversational (``messages``); DPO rows are conversational
``prompt`` / ``chosen`` / ``rejected`` with ``chosen`` the right answer and ``rejected`` a plausible wrong one
(off by one, the other number, the words swapped). Train and held-out splits never share a question.
"""

from __future__ import annotations

import random

WORDS = [
    "apple", "river", "stone", "cloud", "green", "light", "table", "music", "paper", "tiger", "ocean", "bread",
    "chair", "dance", "earth", "flame", "glass", "horse", "island", "jelly", "kite", "lemon", "mouse", "night",
    "orange", "piano", "queen", "robot", "sugar", "train", "union", "voice", "water", "yellow", "zebra", "import",
    "return", "lambda", "class", "yield", "print", "string", "number", "list", "tuple", "object", "module",
]

TASKS = ("add", "max", "next", "repeat")


def _question(rng: random.Random, task: str):
    """(question, answer, wrong answer) for one task."""
    if task == "add":
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        wrong = a + b + rng.choice([-1, 1, 10, -10]) if a + b >= 10 else a + b + 1
        return f"What is {a} + {b}?", str(a + b), str(wrong)
    if task == "max":
        a, b = rng.sample(range(0, 100), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b)), str(min(a, b))
    if task == "next":
        a = rng.randrange(0, 1000)
        return f"What number comes after {a}?", str(a + 1), str(rng.choice([a, a + 2]))
    if task == "repeat":
        w1, w2 = rng.sample(WORDS, 2)
        return f"Repeat the words: {w1} {w2}", f"{w1} {w2}", f"{w2} {w1}"
    raise ValueError(f"unknown task {task!r}; known tasks: {TASKS}")


def _unique_questions(n: int, seed: int, tasks=TASKS):
    """``n`` distinct (task, question, answer, wrong) tuples, tasks interleaved, deterministic by seed."""
    rng = random.Random(seed)
    seen, out = set(), []
    attempts = 0
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        q, a, w = _question(rng, task)
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct questions from tasks {tasks}")
        if q in seen:
            continue
        seen.add(q)
        out.append((task, q, a, w))
    return out


def _split(rows, num_eval):
    return rows[num_eval:], rows[:num_eval]


def sft_dataset(num_train: int = 2000, num_eval: int = 200, seed: int = 0):
    """``DatasetDict(train, test)`` with columns ``messages`` (user question, assistant answer), ``task``,
    ``answer``."""
    import datasets

    rows = _unique_questions(num_train + num_eval, seed)
    train, test = _split(rows, num_eval)

    def build(part):
        return datasets.Dataset.from_dict({
            "messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for _, q, a, _ in part],
            "task": [t for t, *_ in part],
            "answer": [a for _, _, a, _ in part],
        })

    return datasets.DatasetDict({"train": build(train), "test": build(test)})


def dpo_dataset(num_train: int = 1000, num_eval: int = 200, seed: int = 1):
    """``DatasetDict(train, test)`` with conversational ``prompt`` / ``chosen`` / ``rejected`` and ``task``."""
    import datasets

    rows = _unique_questions(num_train + num_eval, seed)
    train, test = _split(rows, num_eval)

    def build(part):
        return datasets.Dataset.from_dict({
            "prompt": [[{"role": "user", "content": q}] for _, q, _, _ in part],
            "chosen": [[{"role": "assistant", "content": a}] for _, _, a, _ in part],
            "rejected": [[{"role": "assistant", "content": w}] for _, _, _, w in part],
            "task": [t for t, *_ in part],
        })

    return datasets.DatasetDict({"train": build(train), "test": build(test)})
