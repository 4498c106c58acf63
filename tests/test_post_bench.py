"""The post-training benchmark (``litespark-train-bench --suite post``): every mode trains, stock and Litespark agree,
the data is variable-length, and the mode-aware FLOPs count matches a hand computation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from litespark_hf.efficiency import flops as F
from litespark_hf.efficiency import post_bench as PB
from litespark_hf.efficiency import post_data as PD

STEPS = 3


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """One in-process run: every mode x {stock, litespark}, 3 steps (steps 2-3 timed), fp32 on CPU."""
    from litespark_hf.cli import train_bench_main

    out = tmp_path_factory.mktemp("post_bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("LITESPARK_PEAK_TFLOPS", "1")  # a CPU has no datasheet peak: give one, so MFU is reported
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared CPU
    try:
        rc = train_bench_main(["--suite", "post", "--config", "tiny", "--variants", "stock,litespark",
                               "--steps", str(STEPS), "--time-from", "2", "--no-isolate", "--no-energy",
                               "--no-progress", "--out", str(out / "post.json")])
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    assert rc == 0
    return json.loads((out / "post.json").read_text()), out


def test_every_row_ok_with_positive_throughput_and_mfu(tiny_result):
    result, out = tiny_result
    assert (out / "post.png").exists()
    rows = {(r["mode"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(m, v) for m in PB.MODES for v in ("stock", "litespark")}
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("status"), r.get("traceback"))
        for field in ("tokens_per_second", "mfu", "step_time_ms", "flops_per_real_token"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (key, field, r[field])
        assert "peak_memory_gib" in r and "energy_per_token_j" in r  # None on CPU / without a meter
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"])
        assert r["timed_steps"] == STEPS - 1
    assert "| sft_packing | litespark | ok |" in result["table"]


def test_litespark_losses_match_stock_per_step(tiny_result):
    result, _ = tiny_result
    for r in result["rows"]:
        stock = next(b for b in result["rows"] if b["mode"] == r["mode"] and b["variant"] == "stock")
        assert max(abs(a - b) for a, b in zip(r["losses"], stock["losses"])) <= 1e-4, r["mode"]
        assert r["loss_max_abs_diff_vs_stock"] is not None and r["loss_max_abs_diff_vs_stock"] <= 1e-4
        for key, diff in r["trl_metrics_max_abs_diff_vs_stock"].items():  # DPO: summed log-probs (~ -300 here)
            assert diff is not None and diff <= 1e-3, (r["mode"], key, diff)


def test_token_counts_follow_the_mode(tiny_result):
    result, _ = tiny_result
    rows = {(r["mode"], r["variant"]): r for r in result["rows"]}
    padded, free, packed = rows["sft_padded", "stock"], rows["sft_padding_free", "stock"], rows["sft_packing", "stock"]
    # padded batches carry padding; padding-free ones are the same real tokens without it
    assert padded["padded_positions_timed"] > padded["real_tokens_timed"]
    assert free["real_tokens_per_step"] == padded["real_tokens_per_step"] == free["positions_per_step"]
    assert packed["real_tokens_per_step"] == packed["positions_per_step"]
    assert min(packed["real_tokens_per_step"]) > max(padded["real_tokens_per_step"])  # 4 blocks of ~max_length
    dpo = rows["dpo_full", "stock"]
    assert all(n == 2 * PB.CONFIGS["tiny"]["dpo_batch"] for n in dpo["sequences_per_step"])  # chosen + rejected
    assert rows["sft_lora", "stock"]["trainable_parameters"] == rows["sft_lora", "stock"]["lora_parameters_formula"]
    assert rows["dpo_lora", "stock"]["args"]["reference"] == "adapters disabled"
    assert dpo["args"]["gradient_checkpointing"] is True  # TRL's default, kept


def test_length_distribution_is_not_constant(tiny_result):
    result, _ = tiny_result
    dist = result["config"]["length_distribution"]
    for stats in (dist["sft"]["total"], dist["sft"]["completion"], dist["dpo"]["sequences"]):
        assert stats["distinct"] > 3 and stats["std"] > 0 and stats["max"] <= PB.CONFIGS["tiny"]["max_length"]
    assert 0 < dist["sft"]["total"]["padding_fraction_batch4"] < 1


def test_data_is_exact_and_long_tailed():
    rows = PD.sft_rows(2000, 2048, 128256, seed=0)
    totals = [len(r["input_ids"]) for r in rows]
    stats = PD.length_stats(totals, 4)
    assert max(totals) == 2048 and stats["median"] < 800 < stats["p90"] and stats["min"] < 100
    assert 0.3 < stats["padding_fraction_batch4"] < 0.6
    for r in rows[:50]:
        assert len(r["completion_mask"]) == len(r["input_ids"]) == r["prompt_length"] + r["completion_length"]
        assert r["input_ids"][0] == PD.BOS_ID and r["input_ids"][-1] == PD.EOS_ID
        assert min(r["input_ids"][1:-1], default=PD.FIRST_CONTENT_ID) >= PD.FIRST_CONTENT_ID
    tok = PD.id_tokenizer(512)
    pairs = PD.dpo_rows(20, 64, 512, seed=1)
    assert sum(len(p["chosen_ids"]) != len(p["rejected_ids"]) for p in pairs) >= 18
    for p in pairs:  # what TRL's DPO preparation tokenizes: the prompt, and prompt + completion
        assert tok(text=p["prompt"])["input_ids"] == p["prompt_ids"]
        assert tok(text=p["prompt"] + p["chosen"])["input_ids"] == p["prompt_ids"] + p["chosen_ids"]
        assert p["chosen"].endswith(tok.eos_token) and p["rejected"].endswith(tok.eos_token)  # no EOS added


def _tiny_config():
    from litespark_hf.efficiency.bench import _hf_config

    return _hf_config(PB.CONFIGS["tiny"])  # Llama: h 64, 2 layers, 4 heads x 16, 2 kv heads, I 128, V 256, tied


def test_flops_hand_computed_lora_and_dpo():
    cfg = _tiny_config()
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*128 + 2 norms 64 = 36,992; 2 layers + final norm
    # 64 = 74,048; LM head (tied embedding) 256*64 = 16,384
    assert F.num_parameters_from_config(cfg) == 74_048 + 16_384
    # LoRA r=16 per layer: q 16*(64+64) + k 16*(64+32) + v 16*(64+32) + o 16*(64+64) + 3 * 16*(64+128) = 16,384
    assert F.lora_parameters(cfg, 16) == 2 * 16_384
    L_d = 2 * 64

    # SFT LoRA: sequences of 10 and 6 tokens (T 16, sum n^2 136), 7 completion tokens scored by the LM head
    got = F.post_training_step_flops(cfg, [10, 6], 7, lora_params=32_768)
    fwd = 2 * 74_048 * 16 + 2 * 32_768 * 16 + 4 * L_d * 136 + 2 * 16_384 * 7
    bwd_in = 2 * 74_048 * 16 + 2 * 32_768 * 16 + 8 * L_d * 136 + 2 * 16_384 * 7
    bwd_w = 2 * 32_768 * 16  # adapters only: frozen weights get no weight gradient
    assert (got["forward"], got["backward_input"], got["backward_weight"], got["reference_forward"]) == (
        fwd, bwd_in, bwd_w, 0)
    assert got["total"] == 8_552_448

    # DPO, full fine-tuning: 2 pairs -> 4 rows of 12, 9, 7, 5 tokens (T 33, sum n^2 299), 14 completion tokens
    got = F.post_training_step_flops(cfg, [12, 9, 7, 5], 14, reference_forward=True)
    ref = 2 * 74_048 * 33 + 4 * L_d * 299 + 2 * 16_384 * 14
    assert got["reference_forward"] == ref == 5_499_008
    assert got["backward_weight"] == 2 * 74_048 * 33 + 2 * 16_384 * 14
    assert got["total"] == 21_996_032

    # DPO LoRA: the adapters' forward/backward on the policy, the reference (adapters disabled) without them
    got = F.post_training_step_flops(cfg, [12, 9, 7, 5], 14, lora_params=32_768, reference_forward=True)
    assert got["reference_forward"] == ref
    assert got["backward_weight"] == 2 * 32_768 * 33
    assert got["total"] == 23_138_176

    # full SFT scoring every position is the 6N + 12 L d T convention
    assert F.post_training_step_flops(cfg, [20], 20)["total"] == F.flops_per_token(cfg, 20) * 20


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = _tiny_config()
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(**PB.LORA))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == F.lora_parameters(cfg, PB.LORA["r"])


def test_split_suite_and_json_path():
    assert PB.split_suite(["--suite", "post", "--config", "tiny"]) == ("post", ["--config", "tiny"])
    assert PB.split_suite(["--suite=post"]) == ("post", [])
    assert PB.split_suite(["--config", "tiny"]) == ("train", ["--config", "tiny"])
    with pytest.raises(SystemExit):
        PB.split_suite(["--suite", "nope"])
    path = PB.default_json_path("llama-1b")
    assert path.startswith("benchmarks/results/post_training_llama-1b_") and path.endswith(".json")
    assert PB.default_json_path("tiny", "x/y.json") == "x/y.json"


def test_warm_up_replays_the_timed_batches(tiny_result):
    """Steps 1..time_from-1 train the timed batches again (same rows, so the same shapes and token counts): one-time
    costs of a new shape fall in the warm-up, not in the timed window."""
    from litespark_hf.efficiency.post_bench import replay_order

    assert replay_order(3, 4, 3) == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    assert replay_order(1, 5, 4) == [0, 1, 0, 0, 1]  # a warm-up longer than the timed window cycles through it
    result, _ = tiny_result
    for r in result["rows"]:
        if r["mode"] == "sft_packing":
            continue  # packed blocks all have one shape: no replay
        real = r["real_tokens_per_step"]
        assert real[:1] == real[1:2], (r["name"], real)  # STEPS=3, time-from 2: step 1 replays step 2's batch


def test_profile_env_vars_write_their_reports(tmp_path, monkeypatch):
    """``LITESPARK_POST_PROFILE`` (torch.profiler) and ``LITESPARK_POST_CPROFILE`` (cProfile) over the timed steps."""
    monkeypatch.setenv("LITESPARK_POST_PROFILE", str(tmp_path / "torch.txt"))
    monkeypatch.setenv("LITESPARK_POST_CPROFILE", str(tmp_path / "c.prof"))
    row = PB.run_one("tiny", "sft_padded", "litespark", 4, 2, progress=False, energy=False, out_dir=str(tmp_path))
    assert row["status"] == "ok"
    torch_report = (tmp_path / "torch.txt").read_text()
    assert torch_report.startswith("timed steps 3: wall ") and "Self CPU" in torch_report
    c_report = (tmp_path / "c.prof.txt").read_text()
    assert c_report.startswith("timed steps 3: wall ") and "training_step" in c_report
    import pstats

    assert pstats.Stats(str(tmp_path / "c.prof")).total_calls > 0


def test_syncs_env_var_counts_host_waits_by_code_line(tmp_path, monkeypatch):
    """``LITESPARK_POST_SYNCS``: the operations that make the host wait for the device, per timed step and code line.
    A padded SFT batch: Litespark's collator counts the real tokens on the CPU (no read in the forward), and TRL's
    SFTTrainer reads its logged metrics back (sft_trainer.py); a reading at a line of its own is counted once."""
    monkeypatch.setenv("LITESPARK_POST_SYNCS", str(tmp_path / "syncs.txt"))
    row = PB.run_one("tiny", "sft_padded", "litespark", 4, 2, progress=False, energy=False, out_dir=str(tmp_path))
    assert row["status"] == "ok"
    lines = (tmp_path / "syncs.txt").read_text().splitlines()
    assert lines[0].startswith("timed steps 3: ") and "host-waiting operations per step" in lines[0]
    per_step = {ln.split(None, 2)[2]: float(ln.split("/step")[0]) for ln in lines[1:]}
    ours = {k: v for k, v in per_step.items() if "/litespark_hf/" in k}
    # the real-token count is read on the CPU in the collator (TokenCountingCollator), not in the forward
    assert ours and all("__call__" in k and "unpadding.py" in k for k in ours), per_step
    assert any("trl/trainer/sft_trainer.py" in k for k in per_step), per_step
    assert abs(sum(per_step.values()) - float(lines[0].split(": ")[1].split()[0])) < 0.11  # the total is the sum

    # the mode counts what it is told to: an item() inside the window is one more at its line
    import types

    calls = []
    mode_cb = PB._syncs_callback(1, str(tmp_path / "direct.txt"))
    state = types.SimpleNamespace(global_step=0)
    mode_cb.on_step_begin(None, state, None)
    for _ in range(3):
        calls.append(torch.tensor([1.0, 2.0]).sum().item())
    mode_cb.on_step_end(None, state, None)
    mode_cb.on_train_end(None, state, None)
    direct = (tmp_path / "direct.txt").read_text().splitlines()
    assert direct[0].startswith("timed steps 1: 3.0 host-waiting"), direct
    assert "_local_scalar_dense" in direct[1] and "3.00/step" in direct[1], direct
    assert calls == [3.0, 3.0, 3.0]


def test_paired_replay_trains_each_timed_batch_twice():
    from litespark_hf.efficiency.post_bench import replay_order

    assert replay_order(1, 6, 3) == [0, 1, 0, 1, 2, 3]  # unpaired, for comparison
    # 2 warm-up steps over the 2 distinct timed batches, then each timed batch twice in a row
    assert replay_order(1, 6, 3, paired=True) == [0, 1, 0, 0, 1, 1]
    assert replay_order(2, 5, 3, paired=True) == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3]  # odd timed window: last batch once


def test_ab_env_var_alternates_a_switch_in_pairs_of_the_same_batch(monkeypatch):
    """LITESPARK_POST_AB=VAR: VAR is "1" then "0" on the two steps of each pair; the pairs see equal batches."""
    monkeypatch.setenv("LITESPARK_POST_AB", "LITESPARK_TEST_SWITCH")
    monkeypatch.setenv("LITESPARK_TEST_SWITCH", "kept")
    row = PB.run_one("tiny", "sft_padded", "litespark", 6, 3, progress=False, energy=False)
    ab = row["ab"]
    assert row["status"] == "ok" and ab["variable"] == "LITESPARK_TEST_SWITCH" and ab["pairs"] == 2
    assert ab["values"][2:] == ["1", "0", "1", "0"]
    assert os.environ["LITESPARK_TEST_SWITCH"] == "kept"  # restored after the run
    timed = row["real_tokens_per_step"][2:]
    assert timed[0] == timed[1] and timed[2] == timed[3]  # a pair trains one batch
    assert ab["on_tokens_per_second"] > 0 and ab["off_tokens_per_second"] > 0 and len(ab["off_over_on_per_pair"]) == 2
    assert "A/B LITESPARK_TEST_SWITCH" in PB.format_table({"rows": [row]})
    with pytest.raises(ValueError, match="LITESPARK_POST_AB"):
        PB.run_one("tiny", "sft_packing", "litespark", 6, 3, progress=False, energy=False)
