"""The attention benchmark compares like with like: its flex-attention mask functions (benchmarks/bench_attention.py)
see exactly the (query, key) pairs of the kernel's packed-documents and sliding-window calls."""

import sys
from pathlib import Path

import pytest
import torch

from litespark_kernels.ops.attention import segment_ids_from_cu_seqlens, visibility_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention  # noqa: E402


@pytest.mark.parametrize("case", ["documents", "window"])
def test_flex_mask_mod_matches_the_kernels_visibility(case):
    S = 37
    q, kv = torch.arange(S)[:, None], torch.arange(S)[None, :]
    if case == "documents":
        seg = segment_ids_from_cu_seqlens(torch.tensor([0, 10, 25, 37]), S)
        mod = bench_attention.flex_mask_mod(seg=seg)
        ref = visibility_mask(S, S, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    else:
        mod = bench_attention.flex_mask_mod(window=5)
        ref = visibility_mask(S, S, causal=True, sliding_window=5)
    got = mod(torch.tensor(0), torch.tensor(0), q, kv)
    assert torch.equal(got, ref.reshape(-1, S, S)[0])
    assert 0 < int(got.sum()) < S * (S + 1) // 2  # something is masked beyond causality
