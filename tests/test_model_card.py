"""The model card's Efficiency section and co2_eq_emissions metadata, parsed back with huggingface_hub.ModelCard."""

from __future__ import annotations

from huggingface_hub import ModelCard

from litespark_hf.efficiency.card import END, START, update_model_card

REPORT = {
    "hardware": {"hardware_used": "2 x NVIDIA H100 80GB HBM3", "num_devices": 2, "peak_flops_per_device": 989e12},
    "precision": "bf16 mixed precision (fp32 master weights)",
    "training_type": "fine-tuning",
    "model": {"num_parameters": 1_235_814_400},
    "training": {"tokens_seen": 123456789, "tokens_per_second_steady": 74946.0, "tokens_per_second_per_device": 37473.0,
                 "mfu_steady": 0.312, "peak_memory_gib": 43.8, "step_time_s_median": 0.2186},
    "energy": {"energy_kwh": 1.25, "gpu_kwh": 1.0, "cpu_kwh": 0.15, "ram_kwh": 0.1, "emissions_g": 71.5,
               "tokens_per_kwh": 98765431.2, "joules_per_token": 0.0364, "country_name": "France",
               "country_iso_code": "FRA", "region": None, "is_estimate": False,
               "source": "CodeCarbon 3.3.2 OfflineEmissionsTracker", "note": "GPU from NVML counters"},
    "gain": {"baseline": "HF sdpa", "speedup": 1.31, "energy_per_token_ratio": 0.66},
}


def test_card_created_and_parsed(tmp_path):
    path = update_model_card(str(tmp_path), REPORT)
    card = ModelCard.load(path)
    assert card.data.co2_eq_emissions == {
        "emissions": 71.5, "source": "CodeCarbon", "training_type": "fine-tuning",
        "geographical_location": "France", "hardware_used": "2 x NVIDIA H100 80GB HBM3"}
    text = card.text
    for needle in ("## Efficiency", "2 x NVIDIA H100 80GB HBM3", "bf16 mixed precision", "123,456,789",
                   "74,946 tokens/s", "31.2%", "43.8 GiB", "1.25 kWh", "71.5 g CO2eq (France)",
                   "1.31x tokens/s", "0.66x energy per token", "Against HF sdpa"):
        assert needle in text, needle


def test_trl_card_section_is_replaced_not_duplicated(tmp_path):
    from trl.trainer.utils import generate_model_card

    card = generate_model_card(base_model="org/base", model_name="my-model", hub_model_id="me/my-model",
                               dataset_name="org/data", tags=["sft"], wandb_url=None, trackio_url=None,
                               trainer_name="SFT")
    card.save(str(tmp_path / "README.md"))
    update_model_card(str(tmp_path), REPORT)
    second = dict(REPORT, energy=dict(REPORT["energy"], emissions_g=80.25))
    update_model_card(str(tmp_path), second)
    parsed = ModelCard.load(str(tmp_path / "README.md"))
    assert parsed.text.count(START) == 1 and parsed.text.count(END) == 1
    assert parsed.data.co2_eq_emissions["emissions"] == 80.25
    assert parsed.data.base_model == "org/base" and "sft" in parsed.data.tags  # TRL's metadata kept
    assert "my-model" in parsed.text and "80.25 g CO2eq" in parsed.text


def test_card_without_energy_has_no_co2_metadata(tmp_path):
    rep = dict(REPORT, energy={"error": "tracker failed"}, gain=None)
    card = ModelCard.load(update_model_card(str(tmp_path), rep))
    assert getattr(card.data, "co2_eq_emissions", None) is None
    assert "not measured (tracker failed)" in card.text


def test_sft_trainer_checkpoint_cards_keep_the_section(tmp_path):
    """TRL regenerates README.md at every checkpoint save and in create_model_card: the section survives."""
    from datasets import Dataset
    from tiny_models import tiny_model, tiny_tokenizer

    from litespark_hf import SFTConfig, SFTTrainer
    from litespark_hf.efficiency import track_efficiency

    texts = [" ".join(f"t{(i * 7 + j) % 120 + 4}" for j in range(8 + i % 5)) for i in range(12)]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=3, save_steps=2,
                     logging_steps=1, report_to=[], bf16=False, use_cpu=True, disable_tqdm=True, max_length=16,
                     dataset_text_field="text")
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tiny_tokenizer())
    track_efficiency(trainer, country_iso_code="DEU", measure_power_secs=1.0)
    trainer.train()
    readme = tmp_path / "sft" / "README.md"
    card = ModelCard.load(str(readme))
    assert card.text.count(START) == 1 and "## Efficiency" in card.text
    assert card.data.co2_eq_emissions["geographical_location"] == "Germany"
    assert "trl" in card.data.tags or "sft" in card.data.tags  # TRL's card underneath
    trainer.create_model_card(model_name="again")  # TRL rewrites the card (as push_to_hub does)
    card = ModelCard.load(str(readme))
    assert card.text.count(START) == 1 and card.data.co2_eq_emissions["source"] == "CodeCarbon"
    assert trainer.state.log_history[-1]["efficiency/train_tokens_seen"] > 0
