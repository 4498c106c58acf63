"""The attention kernel's experimental segment-full blocks (``LITESPARK_ATTN_SEGMENT_FULL``), in Triton's interpreter.

With the option, a block whose query rows all belong to one document that covers the whole key block (and, in the
dK/dV kernel, the other way round) skips the elementwise segment mask. Checked here: the range kernel's [flo, fhi)
never names a column that some row of the block may not see (random contiguous documents, padding, unsorted ids), it
is the exact run for a block inside a document, and the kernel with the option equals ``attention_reference``
forward and backward (fp32 and fp16) on packed rows, padding, unsorted ids, windows and both loop structures.
"""

import pytest
import torch

from litespark_kernels.ops import _attention_triton as at
from litespark_kernels.ops.attention import segment_ids_from_cu_seqlens
from test_attention_kernel import _compare, _inputs


@pytest.fixture
def segment_full(monkeypatch):
    monkeypatch.setattr(at, "SEGMENT_FULL_BLOCKS", True)


def _packed(lengths, pad=0):
    """int32 [sum(lengths) + pad]: document i over its length, then pad tokens of padding (-1)."""
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return segment_ids_from_cu_seqlens(cu, int(cu[-1]) + pad)[0]


def _check_ranges(row_seg, col_seg, block):
    lo, hi, flo, fhi = at._segment_ranges(row_seg, col_seg, block, full=True)
    n_rows = row_seg.shape[1]
    full_blocks = 0
    for b in range(row_seg.shape[0]):
        for blk in range(lo.shape[1]):
            rows = torch.arange(blk * block, (blk + 1) * block)
            r = torch.where(rows < n_rows, row_seg[b, rows.clamp_max(n_rows - 1)], -1)
            f0, f1 = int(flo[b, blk]), int(fhi[b, blk])
            if f1 > f0:
                full_blocks += 1
                c = col_seg[b, f0:f1]
                # every row of the block sees every column of [flo, fhi)
                assert (r >= 0).all() and (c[None, :] == r[:, None]).all(), (b, blk, f0, f1)
                # the run is maximal: lo/hi bound exactly the matching columns of a uniform block
                assert (f0, f1) == (int(lo[b, blk]), int(hi[b, blk]))
            elif (r == r[0]).all() and r[0] >= 0:
                hits = (col_seg[b] == r[0]).nonzero().flatten()
                # a uniform block gets no full range only where its id's columns are not one run
                assert len(hits) == 0 or len(hits) != int(hits[-1] - hits[0] + 1), (b, blk)
    return full_blocks


def test_full_ranges_of_packed_rows_padding_and_unsorted_ids():
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(3):
        lengths = torch.randint(1, 60, (6,), generator=g).tolist()
        rows.append(_packed(lengths, pad=300 - sum(lengths)) if sum(lengths) <= 300 else _packed(lengths)[:300])
    seg = torch.stack(rows)
    assert _check_ranges(seg, seg, 16) > 0
    # unsorted ids: equal ids spread over the row (few or no contiguous runs), and padding inside the row
    mixed = torch.randint(-1, 3, (2, 200), generator=g, dtype=torch.int32)
    mixed[1, 40:120] = 1  # one long run of id 1, with id 1 also elsewhere in the row: no full range for it
    _check_ranges(mixed, mixed, 16)
    # queries and keys with different ids (left-padded keys, as with a KV prefix)
    seg_q = _packed([10, 27, 90])
    seg_kv = torch.cat([torch.full((20,), -1, dtype=torch.int32), seg_q])
    assert _check_ranges(seg_q[None], seg_kv[None], 16) > 0
    assert _check_ranges(seg_kv[None], seg_q[None], 16) > 0


def test_a_block_inside_a_document_gets_its_document():
    seg = _packed([40, 100, 20], pad=4)[None]  # 164 columns; document 1 covers [40, 140)
    lo, hi, flo, fhi = at._segment_ranges(seg, seg, 16, full=True)
    assert (int(flo[0, 4]), int(fhi[0, 4])) == (40, 140)  # rows 64-79: inside document 1
    assert int(fhi[0, 2]) == int(flo[0, 2])  # rows 32-47 straddle documents 0 and 1: none
    assert int(fhi[0, 10]) == int(flo[0, 10])  # rows 160-175: padding and past the end: none
    lo2, hi2, flo2, fhi2 = at._segment_ranges(seg, seg, 16)
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2)  # the option changes only the new outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_rows_and_padding(segment_full, dtype):
    seg = torch.stack([_packed([13, 70, 41], pad=4), _packed([90, 9], pad=29)])
    _compare(*_inputs(2, 4, 2, 128, 128, 64, dtype, seed=4), causal=True, q_segment_ids=seg, kv_segment_ids=seg)


def test_long_row(segment_full):
    seg = _packed([300, 421, 229], pad=50)[None]
    _compare(
        *_inputs(1, 2, 1, 1000, 1000, 64, torch.float16, seed=5), causal=True, q_segment_ids=seg, kv_segment_ids=seg
    )


def test_unsorted_ids_noncausal(segment_full):
    g = torch.Generator().manual_seed(6)
    seg = torch.randint(-1, 3, (2, 96), generator=g, dtype=torch.int32)
    seg[0, 16:64] = 2  # a run long enough for interior blocks, id 2 also outside it
    seg[1, :48] = 0
    seg[1, 48:] = torch.where(seg[1, 48:] == 0, 1, seg[1, 48:])  # id 0 one run of 48 in row 1: full blocks
    _compare(*_inputs(2, 2, 1, 96, 96, 64, torch.float32, seed=6), causal=False, q_segment_ids=seg, kv_segment_ids=seg)


@pytest.mark.parametrize("split", [True, False])
def test_window_lengths_differ_and_both_loop_structures(segment_full, monkeypatch, split):
    monkeypatch.setitem(at.INTERPRETER_CONFIGS, "short", (16, 16, 4, 1, split))
    seg_q = _packed([10, 27, 90])
    seg_kv = torch.cat([torch.full((20,), -1, dtype=torch.int32), seg_q])
    _compare(
        *_inputs(1, 4, 2, 127, 147, 80, torch.float32, seed=8),
        causal=True, sliding_window=40, q_segment_ids=seg_q[None], kv_segment_ids=seg_kv[None],
    )
    seg = _packed([6, 70, 30], pad=4)[None]
    _compare(
        *_inputs(1, 4, 2, 110, 110, 64, torch.float16, seed=15), causal=True, q_segment_ids=seg, kv_segment_ids=seg
    )
