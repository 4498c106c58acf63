"""The model cards the three recipes write (tiny CPU runs, ~20 s): they name the real start (trained from scratch, a
local model, a Hub model), the real data (the embedded default, local files, a Hub data set) and the method
(pre-training, SFT, DPO), load with `huggingface_hub.ModelCard` and carry only true Hub metadata."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import dpo  # noqa: E402
import pretrain  # noqa: E402
import sft  # noqa: E402
from recipe_utils.card import render_model_card  # noqa: E402

COMMON = ["--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--save_strategy", "no",
          "--eval_strategy", "no", "--use_litespark", "false"]
WRONG = ["None", "huggingface.co/datasets/embedded", "datasets/embedded", "trained with SFT", "generated_from_trainer",
         "licence"]


def _card(out: Path):
    from huggingface_hub import ModelCard

    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")  # valid front matter
    meta = card.data.to_dict()
    for bad in WRONG:
        assert bad not in text, (bad, text)
    assert f'pipeline("text-generation", model="{out}")' in text
    assert text.count("## Efficiency") <= 1 and "## Results" in text and "## Training procedure" in text
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    return text, meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards")
    pretrain.main([*COMMON, "--hidden_size", "32", "--num_hidden_layers", "2", "--intermediate_size", "64",
                   "--corpus_max_train_chars", "40000", "--corpus_max_eval_chars", "2000", "--max_length", "64",
                   "--output_dir", str(tmp / "pretrain")])
    data = tmp / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sft.main([*COMMON, "--track_efficiency", "false", "--model_name_or_path", str(tmp / "pretrain"), "--dataset_name",
              str(data), "--per_device_train_batch_size", "4", "--exact_match_samples", "2",
              "--exact_match_max_new_tokens", "2", "--output_dir", str(tmp / "sft")])
    dpo.main([*COMMON, "--track_efficiency", "false", "--model_name_or_path", str(tmp / "sft"), "--dpo_num_train",
              "16", "--dpo_num_eval", "4", "--preference_eval_samples", "4", "--per_device_train_batch_size", "4",
              "--max_length", "64", "--output_dir", str(tmp / "dpo")])
    return tmp


def test_pretraining_card(runs):
    text, meta = _card(runs / "pretrain")
    assert "pre-trained from scratch on the embedded default corpus of litespark_hf" in text
    assert "| Start | none (trained from scratch) |" in text and "| Method | pre-training:" in text
    assert "base_model" not in meta and "datasets" not in meta
    assert {"litespark_hf", "pretrain", "llama"} <= set(meta["tags"])
    # the efficiency section (on by default) is there once, with pre-training as the CO2 training type
    assert "## Efficiency" in text and meta["co2_eq_emissions"]["training_type"] == "pre-training"


def test_sft_card_names_the_local_model_and_file(runs):
    text, meta = _card(runs / "sft")
    assert f"fine-tuned version of the local model `{runs / 'pretrain'}`, trained with supervised fine-tuning " \
           "(SFT) on local file `chat.jsonl`" in text
    assert "base_model" not in meta and "datasets" not in meta  # no false Hub link
    assert '"role": "user"' in text  # a chat model: the quick start sends messages


def test_dpo_card(runs):
    text, meta = _card(runs / "dpo")
    assert f"fine-tuned version of the local model `{runs / 'sft'}`, trained with Direct Preference Optimization " \
           "(DPO) on the embedded default preference set" in text
    assert "Cite DPO as:" in text and "| DPO beta | 0.5 |" in text
    assert "dpo" in meta["tags"] and "sft" not in meta["tags"]


def test_hub_model_and_dataset_are_linked_and_in_the_metadata(tmp_path):
    import torch
    from huggingface_hub import ModelCard

    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="llama")
    args = SimpleNamespace(output_dir=str(tmp_path / "run"), hub_model_id=None, use_litespark=True, max_steps=10,
                           per_device_train_batch_size=2, gradient_accumulation_steps=1, world_size=1,
                           learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.0, bf16=True, fp16=False,
                           max_length=512)
    trainer = SimpleNamespace(args=args, state=SimpleNamespace(global_step=10), model=model,
                              processing_class=SimpleNamespace(chat_template=None))
    card = render_model_card(trainer, "sft", "meta-llama/Llama-3.2-1B", "HuggingFaceFW/fineweb-edu",
                             results={"train_loss": 1.5})
    text = str(card)
    assert "fine-tuned version of [meta-llama/Llama-3.2-1B](https://huggingface.co/meta-llama/Llama-3.2-1B)" in text
    assert "on the [HuggingFaceFW/fineweb-edu](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu) dataset" \
        in text
    card.save(tmp_path / "README.md")
    meta = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]


class _FakeFsdpTrainer:
    """What `save_model` reads of a Trainer under FSDP: the plugin's state-dict type, the gather and the two saves."""

    def __init__(self, state_dict_type: str, should_save: bool = True):
        self.is_fsdp_enabled = True
        self.model = object()
        self.args = SimpleNamespace(should_save=should_save)
        self.calls = []
        plugin = SimpleNamespace(state_dict_type=state_dict_type)
        self.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin),
                                           get_state_dict=lambda m: self.calls.append(("gather", m)) or {"w": 1})

    def _save(self, output_dir, state_dict=None):
        self.calls.append(("_save", output_dir, state_dict))

    def save_model(self, output_dir):
        self.calls.append(("save_model", output_dir))


def test_save_model_gathers_a_sharded_fsdp_state_dict():
    """Under FSDP with SHARDED_STATE_DICT the Trainer's save_model writes no weights (found on the H200: the saved
    directory did not load); the recipes gather the full state dict on every process and the main one writes it."""
    from recipe_utils.card import save_model

    t = _FakeFsdpTrainer("StateDictType.SHARDED_STATE_DICT")
    save_model(t, "out")
    assert t.calls == [("gather", t.model), ("_save", "out", {"w": 1})]
    t = _FakeFsdpTrainer("StateDictType.SHARDED_STATE_DICT", should_save=False)  # another rank: gathers, no write
    save_model(t, "out")
    assert t.calls == [("gather", t.model)]
    t = _FakeFsdpTrainer("StateDictType.FULL_STATE_DICT")  # the Trainer saves this one itself
    save_model(t, "out")
    assert t.calls == [("save_model", "out")]
