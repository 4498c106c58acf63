#!/usr/bin/env python
"""Side-by-side training benchmark (HF sdpa / eager / Liger / torch.compile / Litespark / Litespark + compile).

Same as the console script ``litespark-train-bench``; the logic lives in `litespark_hf.efficiency.bench`.

    python benchmarks/train_bench.py --config llama-1b               # H100: the baselines.md settings
    python benchmarks/train_bench.py --config llama-1b --steps 12 --time-from 5 --variants sdpa,litespark
    python benchmarks/train_bench.py --tiny --no-isolate             # CPU smoke test
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from litespark_hf.cli import train_bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_bench_main())
