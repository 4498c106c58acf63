"""EfficiencyCallback, the FLOPs formula, the peak table and train_bench, on CPU (tiny models, a few steps)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_config, tiny_model
from transformers import LlamaConfig, Trainer, TrainerCallback, TrainingArguments

from litespark_hf.efficiency import (EfficiencyCallback, flops_per_token, mfu, num_parameters,
                                     num_parameters_from_config, peak_flops, track_efficiency)
from litespark_hf.efficiency.callback import _count_tokens


# ------------------------------------------------------------------------------------------------ FLOPs formula
def test_flops_hand_count_tiny_llama():
    cfg = tiny_config("llama")  # hidden 64, 2 layers, 4 heads (head_dim 16), 2 KV heads, intermediate 96, vocab 128
    h, inter, v, layers = 64, 96, VOCAB, 2
    per_layer = (h * 64 + h * 32 + h * 32 + 64 * h) + 3 * h * inter + 2 * h  # q, k, v, o; gate/up/down; 2 norms
    n = 2 * v * h + layers * per_layer + h  # untied embedding + LM head; final norm
    assert n == 78144
    assert num_parameters_from_config(cfg) == n
    assert num_parameters(tiny_model("llama")) == n
    seq = 24
    assert flops_per_token(cfg, seq) == 6 * n + 12 * layers * (4 * 16) * seq == 505728


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_from_config_matches_model(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied)
    assert num_parameters_from_config(model.config) == num_parameters(model) == sum(
        p.numel() for p in model.parameters())


def test_llama_3_2_1b_shape_numbers():
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
    n = num_parameters_from_config(cfg)
    assert n == 1_235_814_400  # tied embedding once (baselines.md: 1,235.8M)
    fpt = flops_per_token(cfg, 2048)
    assert fpt == 6 * n + 12 * 16 * 2048 * 2048 == 8_220_192_768
    # baselines.md: HF sdpa 37,473 tokens/s on an H100 -> 31.2% MFU at 989 TFLOP/s
    assert mfu(fpt * 37473, 989e12) == pytest.approx(0.3115, abs=5e-4)
    assert mfu(fpt * 37473, None) is None


def test_peak_table_and_overrides(monkeypatch):
    monkeypatch.delenv("LITESPARK_PEAK_TFLOPS", raising=False)
    expect = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
              "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100 80GB PCIe": 312, "NVIDIA L40S": 362, "NVIDIA L40": 181,
              "NVIDIA L4": 121, "NVIDIA A10G": 70, "NVIDIA A10": 125, "NVIDIA B200": 2250}
    for name, tflops in expect.items():
        value, source = peak_flops(name)
        assert value == pytest.approx(tflops * 1e12), name
        assert "TFLOP/s" in source
    assert peak_flops("Some Unknown Accelerator")[0] is None
    assert peak_flops("NVIDIA L4", override_tflops=100)[0] == 100e12
    monkeypatch.setenv("LITESPARK_PEAK_TFLOPS", "50")
    assert peak_flops("NVIDIA H100 80GB HBM3")[0] == 50e12


# ------------------------------------------------------------------------------------------------ token counting
def test_count_tokens_padding_packing_plain():
    ids = torch.randint(0, VOCAB, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, :3] = 0  # left padding
    assert _count_tokens((), {"input_ids": ids, "attention_mask": mask}).tolist() == [7 + 5 + 4, 49 + 25 + 16]
    # packed, padding-free: documents of 3, 2 and 4 tokens
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert _count_tokens((), {"input_ids": torch.zeros(1, 9, dtype=torch.long), "position_ids": pos}).tolist() == \
        [9, 9 + 4 + 16]
    # no mask, no positions: known from the shapes, on the host (no copy to the device)
    assert _count_tokens((ids,), {}) == (21, 3 * 49)  # positional input_ids
    assert _count_tokens((), {"inputs_embeds": torch.zeros(2, 5, 8)}) == (10, 50)
    assert _count_tokens((), {}) is None


# ------------------------------------------------------------------------------------------------ Trainer runs
class _PaddedData(torch.utils.data.Dataset):
    """Rows of 20 tokens; row i has 20 - (i % 4) * 3 real tokens (right padding)."""

    def __init__(self, n=16, seq=20):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=g)
        self.real = [seq - (i % 4) * 3 for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = torch.zeros(self.ids.shape[1], dtype=torch.long)
        mask[: self.real[i]] = 1
        labels = self.ids[i].masked_fill(mask == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": labels}


class _Recorder(TrainerCallback):
    """Stands for a reporting callback (TensorBoard, W&B) placed after ours."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(tmp_path, callback_kwargs=None, steps=4, batch=4):
    data = _PaddedData(n=steps * batch)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch, max_steps=steps,
                             logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             learning_rate=1e-3)
    recorder = _Recorder()
    trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=data, callbacks=[recorder])
    cb = track_efficiency(trainer, country_iso_code="FRA", measure_power_secs=1.0, warmup_steps=1,
                          **(callback_kwargs or {}))
    trainer.train()
    return trainer, cb, recorder, data


def test_tiny_trainer_logs_json_png_card(tmp_path):
    trainer, cb, recorder, data = _train(tmp_path)
    out = tmp_path / "out"
    # logs: per interval in log_history, and seen by a reporting callback that comes after ours
    hist = [h for h in trainer.state.log_history if "efficiency/tokens_per_second" in h]
    assert len(hist) == 2 and all(h["efficiency/tokens_per_second"] > 0 for h in hist)
    assert any("efficiency/tokens_per_second" in logs for logs in recorder.logs)
    assert any("efficiency/emissions_g" in logs for logs in recorder.logs)
    # JSON
    rep = json.loads((out / "efficiency.json").read_text())
    tr = rep["training"]
    assert tr["tokens_seen"] == sum(data.real)  # padding excluded, one epoch exactly
    assert tr["global_steps"] == 4 and tr["steady_steps"] == 3
    assert tr["tokens_per_second"] > 0 and tr["step_time_s_median"] > 0
    sumsq = sum(r * r for r in data.real)
    n = num_parameters(trainer.model)
    assert tr["flops_per_token"] == pytest.approx((6 * n * sum(data.real) + 12 * 2 * 64 * sumsq) / sum(data.real))
    assert tr["mfu"] is None and tr["peak_memory_gib"] is None  # CPU: no peak, no CUDA memory
    assert rep["model"]["num_parameters"] == n and "6*N + 12*L*d*T" in rep["model"]["flops_formula"]
    en = rep["energy"]
    assert en["energy_kwh"] > 0 and en["emissions_g"] > 0
    assert en["energy_kwh"] == pytest.approx(en["gpu_kwh"] + en["cpu_kwh"] + en["ram_kwh"], rel=1e-6)
    assert en["tokens_per_kwh"] == pytest.approx(sum(data.real) / en["energy_kwh"])
    assert en["country_iso_code"] == "FRA"
    if not torch.cuda.is_available():
        assert en["is_estimate"] is True and "estimate" in en["note"]
    assert len(rep["timeline"]) == 2
    # PNG
    png = (out / "efficiency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # model card
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(out / "README.md"))
    co2 = card.data.co2_eq_emissions
    assert co2["source"] == "CodeCarbon" and co2["emissions"] == pytest.approx(en["emissions_g"], rel=1e-3)
    assert co2["geographical_location"] == "France" and co2["training_type"] == "pre-training"
    assert "## Efficiency" in card.text and f"{sum(data.real):,}" in card.text


def test_tracker_failure_warns_and_training_goes_on(tmp_path, monkeypatch):
    import codecarbon

    class Broken:
        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            raise OSError("simulated tracker failure")

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", Broken)
    with pytest.warns(RuntimeWarning, match="simulated tracker failure"):
        trainer, cb, _, data = _train(tmp_path, steps=2)
    assert trainer.state.global_step == 2
    rep = json.loads((tmp_path / "out" / "efficiency.json").read_text())
    assert rep["training"]["tokens_seen"] == sum(data.real)
    assert "simulated tracker failure" in rep["energy"]["error"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(tmp_path / "out" / "README.md"))
    assert getattr(card.data, "co2_eq_emissions", None) is None and "not measured" in card.text


def test_tracker_stop_failure_is_contained(tmp_path, monkeypatch):
    from litespark_hf.efficiency import energy

    monkeypatch.setattr(energy.CodeCarbonMeter, "sample", lambda self: (_ for _ in ()).throw(RuntimeError("x")))
    real_stop = energy.CodeCarbonMeter.stop

    def bad_stop(self):
        real_stop(self)
        raise RuntimeError("stop exploded")

    monkeypatch.setattr(energy.CodeCarbonMeter, "stop", bad_stop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, cb, _, _ = _train(tmp_path, steps=2)
    assert trainer.state.global_step == 2
    assert any("stop exploded" in str(w.message) for w in caught)
    rep = json.loads((tmp_path / "out" / "efficiency.json").read_text())
    assert rep["energy"]["error"] and rep["training"]["tokens_seen"] > 0


def test_baseline_gain_in_json_and_card(tmp_path):
    baseline = {"name": "HF sdpa run", "tokens_per_second": 1.0, "joules_per_token": 1e9}
    _, cb, _, _ = _train(tmp_path, callback_kwargs={"baseline": baseline}, steps=2)
    rep = json.loads((tmp_path / "out" / "efficiency.json").read_text())
    assert rep["gain"]["speedup"] == pytest.approx(rep["training"]["tokens_per_second_steady"])
    assert rep["gain"]["energy_per_token_ratio"] < 1
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Against HF sdpa run" in text


def test_callback_without_energy_and_plain_trainer_callbacks_list(tmp_path):
    data = _PaddedData(n=8)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    cb = EfficiencyCallback(track_energy=False, write_plot=False)
    trainer = Trainer(model=tiny_model("qwen2"), args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    rep = json.loads((tmp_path / "o" / "efficiency.json").read_text())
    assert rep["energy"] is None and rep["training"]["tokens_seen"] == sum(data.real)
    assert not os.path.exists(tmp_path / "o" / "efficiency.png")
    # appended after the reporting callbacks: the keys still reach log_history
    assert any("efficiency/tokens_per_second" in h for h in trainer.state.log_history)


# ------------------------------------------------------------------------------------------------ train_bench
def test_train_bench_tiny_survives_a_failing_variant(tmp_path, monkeypatch):
    from litespark_hf.efficiency import bench
    from litespark_hf.efficiency.device import device_tag

    monkeypatch.setitem(bench.VARIANTS, "broken", ("no_such_attention", {}, None))
    result = bench.run_bench("tiny", ["sdpa", "broken", "litespark"], steps=4, time_from=2, out_dir=str(tmp_path),
                             isolate=False, progress=False)
    by = {r["name"]: r for r in result["variants"]}
    assert by["sdpa"]["status"] == "ok" and by["litespark"]["status"] == "ok"
    assert by["broken"]["status"].startswith("error")
    assert by["sdpa"]["speedup"] == 1.0 and by["litespark"]["speedup"] > 0
    assert by["sdpa"]["tokens_per_step"] == 2 * 64 and by["sdpa"]["timed_steps"] == 3
    assert by["sdpa"]["joules_per_token"] is None or by["sdpa"]["joules_per_token"] > 0
    # same data, seed and model: the Litespark layers (reference paths on CPU) train the same losses
    assert by["litespark"]["losses"] == pytest.approx(by["sdpa"]["losses"], abs=1e-3)
    stem = f"train_bench_tiny_{device_tag()}"  # train_bench_tiny_cpu on a machine without CUDA
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [r["name"] for r in saved["variants"]] == ["sdpa", "broken", "litespark"]
    assert "| sdpa | ok |" in saved["table"]
    assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"


def test_train_bench_cli_entry(tmp_path, capsys):
    from litespark_hf.cli import train_bench_main
    from litespark_hf.efficiency.device import device_tag

    assert train_bench_main(["--tiny", "--variants", "eager", "--steps", "2", "--time-from", "1", "--no-isolate",
                             "--no-progress", "--out", str(tmp_path), "--tag", "cli"]) == 0
    out = capsys.readouterr().out
    assert "| eager | ok |" in out
    assert (tmp_path / f"train_bench_tiny_{device_tag()}_cli.json").exists()


def test_every_bench_variant_config_parses_and_the_diagnostics_switch_one_part_off():
    """Each variant's ``litespark_config`` is a valid LitesparkConfig, and the diagnostic variants turn off exactly
    the part they are named after (the rest at its default)."""
    import json

    from litespark_hf.config import LitesparkConfig
    from litespark_hf.efficiency import bench

    default = LitesparkConfig()
    off = {"litespark_clip_unfolded": ("fused_grad_clip", False), "litespark_torch_adamw": ("fused_optimizer", False),
           "litespark_checkpoint_all": ("checkpoint_layers", "all"),
           "litespark_zero3_fine": ("zero3_layer_units", False),
           "litespark_no_prefetch": ("fsdp2_forward_prefetch", False)}
    for name, (attn, overrides, _) in bench.VARIANTS.items():
        raw = overrides.get("litespark_config")
        if raw is None:
            continue
        assert overrides.get("use_litespark") is True, name
        cfg = LitesparkConfig.from_any(raw)
        if name in off:
            key, value = off[name]
            assert getattr(cfg, key) == value != getattr(default, key), name
            changed = [f for f in json.loads(raw)]
            assert changed == [key], name
    assert set(off) <= set(bench.VARIANTS)
