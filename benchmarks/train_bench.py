"""Alias of the console script ``litespark-train-bench`` (logic in `litespark_hf.efficiency.bench`; see --help)."""

if __name__ == "__main__":
    from litespark_hf.cli import train_bench_main
    raise SystemExit(train_bench_main())
