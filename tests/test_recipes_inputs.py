"""Inputs a new user tries that nobody listed (quick, CPU): one .txt file, a directory of .jsonl files, a JSON array
file, DPO from a fresh model (no earlier stage), a short streamed run."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import dpo  # noqa: E402
import pretrain  # noqa: E402
import sft  # noqa: E402
from recipe_utils.args import DataArguments  # noqa: E402
from recipe_utils.data import load_any_dataset  # noqa: E402

TINY = ["--track_efficiency", "false", "--max_steps", "1", "--logging_steps", "1", "--disable_tqdm", "true",
        "--save_strategy", "no", "--use_litespark", "false"]
SHAPE = ["--hidden_size", "32", "--num_hidden_layers", "2", "--intermediate_size", "64", "--max_length", "64"]


def _no_embedded():
    raise AssertionError("the embedded default must not be used")


def test_one_txt_file_is_split_into_documents_at_blank_lines(tmp_path):
    """A single .txt file was one row: the held-out split failed (train_test_split of 1 row)."""
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Paragraph {i}. " + "word " * 30 for i in range(50)))
    train, test, source = load_any_dataset(DataArguments(dataset_name=str(book)), _no_embedded)
    assert len(train) + len(test) == 50 and len(test) >= 1 and source == str(book)
    assert train[0]["text"].startswith("Paragraph")
    several = tmp_path / "docs"
    several.mkdir()
    for i in range(4):
        (several / f"{i}.txt").write_text(f"doc {i}\n\nsecond paragraph")
    train, test, _ = load_any_dataset(DataArguments(dataset_name=str(several)), _no_embedded)
    assert len(train) + len(test) == 4  # several files: one document each


def test_directory_of_jsonl_and_json_array(tmp_path):
    d = tmp_path / "chats"
    (d / "more").mkdir(parents=True)
    for k, sub in enumerate(("", "more")):
        (d / sub / f"part{k}.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"What is {i} + {k}?"}, {"role": "assistant", "content": str(i + k)}]}) + "\n"
            for i in range(25)))
    (d / "notes.md").write_text("not data")
    train, test, _ = load_any_dataset(DataArguments(dataset_name=str(d)), _no_embedded)
    assert len(train) + len(test) == 50 and train.column_names == ["messages"]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": f"x = {i}"} for i in range(30)]))
    train, test, _ = load_any_dataset(DataArguments(dataset_name=str(arr), eval_fraction=0.1), _no_embedded)
    assert (len(train), len(test)) == (27, 3)


def test_dpo_from_a_fresh_model(tmp_path):
    """Without outputs/sft or outputs/pretrain, dpo.py starts from a fresh tiny model; TRL then tried to reload the
    reference model from the fresh model's (empty) path and failed with a Hub repo-id error."""
    r = dpo.main([*TINY, "--max_length", "64", "--start_from", str(tmp_path / "none"), "--dpo_num_train", "16", "--dpo_num_eval", "4",
                  "--preference_eval_samples", "4", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
                  "--output_dir", str(tmp_path / "dpo")])
    assert r["steps"] == 1 and r["start"].startswith("fresh tiny llama")
    assert (tmp_path / "dpo" / "model.safetensors").is_file()


def test_streamed_local_file_and_plain_text_sft(tmp_path):
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(40)))
    r = pretrain.main([*TINY, *SHAPE, "--dataset_name", str(data), "--dataset_streaming", "true", "--max_eval_samples", "5",
                       "--corpus_max_train_chars", "1000", "--output_dir", str(tmp_path / "p")])
    assert r["steps"] == 1 and r["heldout_loss_after"] is not None
    r = sft.main([*TINY, "--dataset_name", str(data), "--start_from", str(tmp_path / "p"), "--output_dir",
                  str(tmp_path / "s")])
    assert r["steps"] == 1 and r["start"] == str(tmp_path / "p")


def test_no_evaluation_before_training_reports_no_before_figure(tmp_path):
    """With --eval_on_start false the first logged evaluation (at step 1 here) was reported as 'before'."""
    r = pretrain.main([*TINY, *SHAPE, "--max_steps", "2", "--eval_steps", "1", "--eval_on_start", "false",
                       "--corpus_max_train_chars", "20000", "--corpus_max_eval_chars", "2000",
                       "--output_dir", str(tmp_path / "p")])
    assert r["heldout_loss_before"] is None and r["heldout_ppl_before"] is None
    assert r["heldout_loss_after"] > 0
