"""Console scripts of litespark_hf."""

from __future__ import annotations


def train_bench_main(argv: list[str] | None = None) -> int:
    """``litespark-train-bench``: the side-by-side training benchmark (see `litespark_hf.efficiency.bench`)."""
    from .efficiency.bench import main

    return main(argv)
