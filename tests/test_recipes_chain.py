"""The shortened embedded chain (pre-train -> SFT -> DPO, `recipes/chain.py --quick`) improves all three held-out
figures: pre-training lowers the held-out loss, SFT raises greedy exact match, DPO's implicit reward prefers the chosen
answer on most held-out pairs with a positive margin. About 2 minutes on 2 CPU cores (marked slow; it still runs in CI)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


@pytest.mark.slow
def test_quick_chain_improves_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import chain

    fig = chain.main(["--quick", "--output_dir", str(tmp_path), "--disable_tqdm", "true"])
    p, s, d = fig["pretrain"], fig["sft"], fig["dpo"]
    assert p["heldout_loss_before"] > 7.0  # ~ln(2048) for an untrained model
    assert p["heldout_loss_after"] < p["heldout_loss_before"] - 1.0
    assert s["heldout_exact_match_before"] == 0.0
    assert s["heldout_exact_match_after"] > s["heldout_exact_match_before"]
    # DPO: the implicit reward (beta * log-ratio to the SFT reference) prefers the chosen answer on most held-out
    # pairs (0 before: policy == reference) with a positive mean margin. The raw log-prob preference accuracy
    # (log p(chosen) > log p(rejected)) after SFT varies by machine (~88% where this test was written, 79.5% on the
    # AMD EPYC machine of session 20, at the same commit); at lr 3e-4 DPO moves it by a few points (up in the full
    # chain, within +-2 points over 400 pairs on other training sets, -3.5 points = 7 of 200 pairs on the EPYC
    # machine), so the test asserts it does not fall beyond the noise of 200 pairs (two standard errors of a
    # proportion near 0.8: 2 * sqrt(0.8 * 0.2 / 200) = 0.057) rather than that it rises.
    assert d["heldout_pairs"] == 200
    assert d["heldout_reward_accuracy_after"] > 0.6
    assert d["heldout_reward_margin_after"] > d["heldout_reward_margin_before"] + 0.05
    assert d["heldout_pref_accuracy_after"] >= d["heldout_pref_accuracy_before"] - 0.06
    for stage in ("pretrain", "sft", "dpo"):
        out = tmp_path / stage
        for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "results.json"):
            assert (out / name).is_file(), f"{stage} did not write {name}"
        assert "## Results" in (out / "README.md").read_text()
    assert json.loads((tmp_path / "chain_results.json").read_text())["dpo"]["steps"] == 40
