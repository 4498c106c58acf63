"""Console scripts of litespark_hf."""

from __future__ import annotations


def train_bench_main(argv: list[str] | None = None) -> int:
    """``litespark-train-bench``: the side-by-side training benchmark (see `litespark_hf.efficiency.bench`);
    ``--suite post``: the post-training benchmark, TRL SFT/DPO (see `litespark_hf.efficiency.post_bench`)."""
    from .efficiency.post_bench import split_suite

    suite, rest = split_suite(argv)
    if suite == "post":
        from .efficiency.post_bench import main as post_main

        return post_main(rest)
    from .efficiency.bench import main

    return main(rest)


def run_main(argv: list[str] | None = None) -> int:
    """``litespark-run``: run a TRL / transformers training script with litespark_hf's trainer classes in place of
    TRL's, so that it takes ``--use_litespark`` (see `litespark_hf.run`; ``litespark-run --help``)."""
    from .run import main

    return main(argv)
