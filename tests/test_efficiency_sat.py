"""The efficiency callback under Sparsity-Accelerated Training: MFU on executed FLOPs, dense-equivalent beside it."""

import json

import pytest
from datasets import Dataset

import litespark_hf
from litespark_hf.efficiency import EfficiencyCallback
from tiny_models import random_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_sat_run_reports_executed_and_dense_equivalent_mfu(tmp_path, monkeypatch):
    monkeypatch.setenv("LITESPARK_PEAK_TFLOPS", "1.0")  # a CPU has no peak-table entry; any peak will do here
    model = tiny_model("llama", num_hidden_layers=4)
    ids = random_batch(batch=8, seq=16)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    cfg = {"sat_omission_rate_mlp": 0.5, "sat_omission_rate_heads": 0.5, "sat_exempt_layers": "",
           "sat_schedule": "constant", "sat_refresh_interval": 0}
    args = litespark_hf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        use_litespark=True, litespark_config=json.dumps(cfg), save_strategy="no", logging_steps=2)
    trainer = litespark_hf.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[EfficiencyCallback(track_energy=False)])
    trainer.train()
    report = json.loads((tmp_path / "efficiency.json").read_text())["training"]
    assert 0.3 < report["executed_flops_fraction"] < 1.0
    assert report["mfu"] == pytest.approx(report["mfu_dense_equivalent"] * report["executed_flops_fraction"])
    assert "executed" in report["mfu_note"]
