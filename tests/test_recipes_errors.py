"""Bad input to the recipes: one clear message saying what to change, and nothing written. Quick (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import chain  # noqa: E402
import dpo  # noqa: E402
import pretrain  # noqa: E402
import sft  # noqa: E402
from recipe_utils import RecipeError  # noqa: E402
from recipe_utils.output_dir import RUN_MARKER  # noqa: E402

RECIPES = {"pretrain": pretrain, "sft": sft, "dpo": dpo}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def _fails(main, argv, match, out):
    with pytest.raises(RecipeError, match=match):
        main(argv + ["--output_dir", str(out)])
    assert not out.exists() or sorted(os.listdir(out)) == sorted(_preexisting.get(str(out), [])), \
        "a failed run must not write to its output directory"


_preexisting = {}


def test_unknown_model_type(tmp_path):
    _fails(pretrain.main, ["--model_type", "lama"], r"unknown model_type 'lama' \(did you mean 'llama'\?\); choose one",
           tmp_path / "out")


def test_yaml_key_that_matches_no_argument(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\nlearning_rat: 0.1\nhiden_size: 64\n")
    _fails(pretrain.main, ["--config", str(cfg)],
           r"'learning_rat' \(did you mean 'learning_rate'\?\), 'hiden_size' \(did you mean 'hidden_size'\?\) "
           r"match no argument", tmp_path / "out")


def test_missing_or_misnamed_columns(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) for _ in range(5)))
    _fails(sft.main, ["--dataset_name", str(data)], r"sft needs dataset columns 'messages' or 'prompt'\+'completion' "
           r"or 'text', but the dataset has \['conversation'\]", tmp_path / "out")
    pref = tmp_path / "p.jsonl"
    pref.write_text("\n".join(json.dumps({"prompt": "q", "chosen": "a", "rejectd": "b"}) for _ in range(5)))
    _fails(dpo.main, ["--dataset_name", str(pref)], r"rename 'rejectd' -> 'rejected'", tmp_path / "out2")
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"content": "x = 1"}) for _ in range(5)))
    _fails(pretrain.main, ["--dataset_name", str(text)], r"set dataset_text_field", tmp_path / "out3")


def test_missing_local_file(tmp_path):
    _fails(sft.main, ["--dataset_name", str(tmp_path / "nope.jsonl")], "does not exist", tmp_path / "out")


def test_hub_dataset_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(sft.main, ["--dataset_name", "someone-unknown/no-such-dataset-xyz"],
           r"cannot be loaded while offline \(HF_HUB_OFFLINE=1\).*unset dataset_name", tmp_path / "out")


def test_output_dir_holding_another_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_MARKER).write_text(json.dumps({"recipe": "sft", "fingerprint": "x"}))
    (out / "model.safetensors").write_text("previous run")
    _preexisting[str(out)] = os.listdir(out)
    # another recipe's run: resuming it with this recipe makes no sense, so the message does not suggest it
    with pytest.raises(RecipeError, match=r"holds a sft run \(another recipe\); choose another --output_dir, or "
                                          r"pass --overwrite_output_dir true") as e:
        pretrain.main(["--output_dir", str(out)])
    assert "resume" not in str(e.value)
    assert sorted(os.listdir(out)) == sorted(_preexisting[str(out)])
    # the same recipe with other arguments, interrupted (a checkpoint, no final results): resuming is offered
    (out / RUN_MARKER).write_text(json.dumps({"recipe": "pretrain", "fingerprint": "x", "finished": False}))
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5, "max_steps": 10}))
    _preexisting[str(out)] = os.listdir(out)
    _fails(pretrain.main, [], r"already holds another pretrain run \(different arguments\); pass "
                              r"--overwrite_output_dir true to replace it, --resume_from_checkpoint true to continue "
                              r"it, or choose another --output_dir", out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("user files")
    _preexisting[str(other)] = os.listdir(other)
    _fails(pretrain.main, ["--overwrite_output_dir", "true"], "not a litespark recipe run", other)


def test_resume_from_missing_checkpoint(tmp_path):
    _fails(pretrain.main, ["--resume_from_checkpoint", str(tmp_path / "checkpoint-99")],
           r"checkpoint .*checkpoint-99 does not exist", tmp_path / "out")
    _fails(pretrain.main, ["--resume_from_checkpoint", "true"], "holds no checkpoint", tmp_path / "out")


@pytest.mark.parametrize("argv, first", [
    (["--model_type", "gpt9"], "error: unknown model_type 'gpt9'"),
    (["--litespark_config", "{bogus"], "error: --litespark_config is not valid JSON"),
    (["--bogus_flag", "3"], "error: unknown argument --bogus_flag"),
])
def test_command_line_prints_one_line_and_exit_status_2(tmp_path, argv, first):
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), *argv,
                        "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(first)
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------------------
# --help, unknown flags, bad values: one line, no traceback
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["pretrain", "sft", "dpo", "chain"])
def test_help_of_every_recipe(recipe, capsys):
    main = chain.main if recipe == "chain" else RECIPES[recipe].main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--output_dir" in out
    if recipe == "pretrain":
        assert "held-out files, in percent" in out  # the help string whose bare '%' crashed --help


def test_help_on_the_command_line():
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--help"], capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: recipes/pretrain.py") and "--corpus_heldout_percent" in r.stdout


@pytest.mark.parametrize("argv, match", [
    (["--max_stepz", "3"], r"unknown argument --max_stepz \(did you mean --max_steps\?\); python "
                           r"recipes/pretrain.py --help lists the arguments"),
    (["--max_steps", "3", "oops"], r"unexpected argument 'oops'"),
    (["--max_steps", "abc"], r"argument --max_steps.*invalid int value: 'abc'"),
    (["--use_litespark", "maybe"], r"argument --use_litespark.*"),
])
def test_unknown_flag_or_bad_value(tmp_path, argv, match):
    _fails(pretrain.main, argv, match, tmp_path / "out")


@pytest.mark.parametrize("value, match", [
    ('{"bogus": 1}', r"--litespark_config: unknown key 'bogus'; known keys: allow_partial, attention"),
    ('{"ropee": false}', r"unknown key 'ropee' \(did you mean 'rope'\?\)"),
    ("{bogus", r"--litespark_config is not valid JSON \(Expecting property name enclosed in double quotes at "
               r"character 2\); give a JSON object such as"),
    ("[1, 2]", r"--litespark_config must be a JSON object"),
])
def test_bad_litespark_config(tmp_path, value, match):
    _fails(pretrain.main, ["--litespark_config", value], match, tmp_path / "out")


def test_litespark_config_in_a_yaml_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("litespark_config:\n  fused_cross_entropy: false\n  bogus: 1\n")
    _fails(pretrain.main, ["--config", str(cfg)], r"litespark_config \(config file\): unknown key 'bogus'",
           tmp_path / "out")


def test_yaml_that_does_not_parse(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\nlearning_rate: [0.1\n")
    _fails(pretrain.main, ["--config", str(cfg)], r"config file .*c.yaml line \d+ is not valid YAML", tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------------
# Numbers the Trainer accepts and silently trains something else with
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, argv, match", [
    ("pretrain", ["--max_steps", "0"], r"--max_steps 0: give a positive number of optimizer steps, or -1 to train "
                                       r"for --num_train_epochs"),
    ("pretrain", ["--max_steps", "-3"], r"--max_steps -3: give a positive number"),
    ("pretrain", ["--max_steps", "-1", "--num_train_epochs", "0"], r"--num_train_epochs 0.0: must be > 0"),
    ("pretrain", ["--max_length", "1"], r"--max_length 1: must be at least 2 tokens"),
    ("sft", ["--max_length", "1", "--packing", "true"], r"--max_length 1: must be at least 2 tokens"),
    ("dpo", ["--max_length", "0"], r"--max_length 0: must be at least 2 tokens"),
    ("pretrain", ["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size 0: must be at least 1"),
    ("sft", ["--per_device_eval_batch_size", "0"], r"--per_device_eval_batch_size 0: must be at least 1"),
    ("pretrain", ["--gradient_accumulation_steps", "0"], r"--gradient_accumulation_steps 0: must be at least 1"),
    ("pretrain", ["--learning_rate", "-0.001"], r"--learning_rate -0.001: must not be negative"),
    ("pretrain", ["--warmup_steps", "-5"], r"warmup_steps.* -5.0"),  # transformers checks this one itself
    ("pretrain", ["--max_grad_norm", "-1"], r"--max_grad_norm -1.0: must not be negative"),
    ("pretrain", ["--eval_steps", "-10"], r"--eval_steps -10.0: must be > 0"),
    ("sft", ["--eval_fraction", "1.5"], r"--eval_fraction 1.5: must be in \[0, 1\)"),
    ("dpo", ["--eval_fraction", "-0.1"], r"--eval_fraction -0.1: must be in \[0, 1\)"),
    ("pretrain", ["--max_train_samples", "0"], r"--max_train_samples 0: must be at least 1"),
    ("sft", ["--max_eval_samples", "0"], r"--max_eval_samples 0: must be at least 1"),
    ("pretrain", ["--corpus_heldout_percent", "0"], r"--corpus_heldout_percent 0.0: must be in \(0, 100\)"),
    ("pretrain", ["--corpus_max_train_chars", "0"], r"--corpus_max_train_chars 0: must be at least 1"),
    ("sft", ["--sft_num_train", "0"], r"--sft_num_train 0: must be at least 1"),
    ("sft", ["--exact_match_samples", "-1"], r"--exact_match_samples -1: must not be negative"),
    ("dpo", ["--beta", "0"], r"--beta 0.0: must be > 0"),
    ("dpo", ["--dpo_num_eval", "0"], r"--dpo_num_eval 0: must be at least 1"),
])
def test_numeric_flags_out_of_range(tmp_path, recipe, argv, match):
    _fails(RECIPES[recipe].main, argv, match, tmp_path / "out")


def test_model_shape_and_vocabulary(tmp_path):
    _fails(pretrain.main, ["--num_attention_heads", "3"], r"--num_attention_heads 3 does not divide --hidden_size 128",
           tmp_path / "out")
    _fails(pretrain.main, ["--num_key_value_heads", "3"], r"--num_key_value_heads 3 does not divide "
           r"--num_attention_heads 4", tmp_path / "out")
    _fails(pretrain.main, ["--hidden_size", "0"], r"--hidden_size 0: must be a positive integer", tmp_path / "out")
    _fails(pretrain.main, ["--max_length", "8192"], r"--max_length 8192 exceeds --max_position_embeddings 4096",
           tmp_path / "out")
    for recipe in ("pretrain", "sft", "dpo"):
        _fails(RECIPES[recipe].main, ["--tokenizer_vocab_size", "1"], r"--tokenizer_vocab_size 1: the embedded "
               r"byte-level tokenizer needs at least 2\d\d tokens", tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------------
# Data files and model paths
# --------------------------------------------------------------------------------------------------------------------
def test_empty_or_corrupt_jsonl(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(pretrain.main, ["--dataset_name", str(empty)], r"dataset file .*empty.jsonl is empty \(no rows\)",
           tmp_path / "out")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    _fails(sft.main, ["--dataset_name", str(blank)], r"dataset file .*blank.jsonl is empty", tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a = 1"}\n{"text": "b = 2"}\n{"text": "c = 3",}\n')
    _fails(pretrain.main, ["--dataset_name", str(bad)], r"dataset file .*bad.jsonl line 3 is not valid JSON "
           r"\(Expecting property name enclosed in double quotes, column 18\); fix or remove that line",
           tmp_path / "out")
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"text": "a"}\n"just a string"\n')
    _fails(pretrain.main, ["--dataset_name", str(scalar)], r"scalar.jsonl line 2 holds a JSON str, not an object",
           tmp_path / "out")


def test_one_row_is_too_few_to_hold_out(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "x = 1\n" * 50}) + "\n")
    _fails(pretrain.main, ["--dataset_name", str(one)], r"has 1 row: too few to hold out eval_fraction 0.02 of them; "
           r"give more rows, a 'test' split, or --eval_fraction 0", tmp_path / "out")


def test_local_model_path_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for recipe in ("pretrain", "sft", "dpo"):
        _fails(RECIPES[recipe].main, ["--model_name_or_path", str(tmp_path / "models" / "mine")],
               r"model path .*models/mine does not exist \(no such directory\); give an existing model directory",
               tmp_path / "out")
    _fails(sft.main, ["--model_name_or_path", "./my-model"], r"model path ./my-model does not exist", tmp_path / "out")
    # owner/name may be a Hub id: offline, the message says both
    _fails(sft.main, ["--model_name_or_path", "someone/no-such-model-xyz"], r"model 'someone/no-such-model-xyz' is "
           r"not a local directory \(no such path\), and offline \(HF_HUB_OFFLINE=1\)", tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    _fails(sft.main, ["--model_name_or_path", str(tmp_path / "empty_dir")], r"holds no model \(no config.json",
           tmp_path / "out")


def test_lora_target_modules_that_match_nothing(tmp_path):
    """peft's error would come from inside the trainer's constructor; the recipe names the model's linear layers."""
    _fails(sft.main, ["--use_peft", "--lora_target_modules", "foo_proj", "--start_from", str(tmp_path / "none"),
                      "--sft_num_train", "16", "--sft_num_eval", "4", "--exact_match_samples", "0"],
           r"--lora_target_modules foo_proj matches no module of the model; its linear layers are .*q_proj",
           tmp_path / "out")


def test_litespark_flags_with_litespark_off(tmp_path):
    _fails(pretrain.main, ["--use_litespark", "false", "--sat_omission_rate_mlp", "0.5"],
           r"--sat_omission_rate_mlp need Litespark, which --use_litespark false turns off", tmp_path / "out")


def test_compile_layers_with_torch_compile(tmp_path):
    _fails(pretrain.main, ["--compile_layers", "true", "--torch_compile", "true"],
           r"--compile_layers true compiles each decoder layer and --torch_compile true the whole model: use one of "
           r"them", tmp_path / "out")


def test_litespark_is_on_by_default():
    from trl import ModelConfig

    from litespark_hf import DPOConfig, SFTConfig
    from recipe_utils.args import parse_args

    classes = {"pretrain": (pretrain.PretrainArguments, SFTConfig, ModelConfig),
               "sft": (sft.SFTScriptArguments, SFTConfig, ModelConfig),
               "dpo": (dpo.DPOScriptArguments, DPOConfig, ModelConfig)}
    for recipe, types in classes.items():
        defaults = RECIPES[recipe].defaults()
        assert parse_args(types, [], defaults, recipe)[1].use_litespark is True, recipe
        assert parse_args(types, ["--use_litespark", "false"], defaults, recipe)[1].use_litespark is False
        # a LitesparkConfig flag alone takes effect (no --use_litespark needed)
        t = parse_args(types, ["--sat_omission_rate_mlp", "0.5"], defaults, recipe)[1]
        assert t.use_litespark and json.loads(t.litespark_config)["sat_omission_rate_mlp"] == 0.5
    import dataclasses

    # the library's own default is unchanged
    assert next(f for f in dataclasses.fields(SFTConfig) if f.name == "use_litespark").default is False


# --------------------------------------------------------------------------------------------------------------------
# Found by trying the recipes as a new user would
# --------------------------------------------------------------------------------------------------------------------
TINY = ["--hidden_size", "32", "--num_hidden_layers", "2", "--intermediate_size", "64", "--corpus_max_train_chars",
        "20000", "--corpus_max_eval_chars", "2000", "--max_length", "64", "--track_efficiency", "false"]


def test_use_peft_with_pretraining(tmp_path):
    """--use_peft was silently ignored by pretrain.py (it trained all the weights)."""
    _fails(pretrain.main, ["--use_peft"], r"--use_peft: pre-training trains all the weights", tmp_path / "out")


def test_packing_without_max_length(tmp_path):
    _fails(sft.main, ["--packing", "true"], r"--packing true packs examples into rows of max_length tokens: give "
           r"--max_length", tmp_path / "out")


def test_attention_implementation_that_is_not_installed(tmp_path):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash_attn is installed here")
    except ImportError:
        pass
    _fails(pretrain.main, [*TINY, "--attn_implementation", "flash_attention_2"],
           r"--attn_implementation flash_attention_2: .*; use sdpa or eager", tmp_path / "out")


def test_empty_output_dir_name(tmp_path):
    with pytest.raises(RecipeError, match=r"--output_dir is empty; give the directory the run writes to"):
        pretrain.main(["--output_dir", ""])


def test_report_to_an_integration_that_is_not_installed(tmp_path):
    from transformers.integrations import get_available_reporting_integrations

    if "wandb" in get_available_reporting_integrations():
        pytest.skip("wandb is installed here")
    _fails(pretrain.main, ["--report_to", "wandb"], r"--report_to wandb: not installed in this environment \(pip "
           r"install wandb\)", tmp_path / "out")


def test_stream_too_small_for_its_held_out_rows(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"x = {i}"}) + "\n" for i in range(20)))
    _fails(pretrain.main, [*TINY, "--dataset_name", str(data), "--dataset_streaming", "true", "--max_steps", "2"],
           r"the stream has no rows left for training after the first 200 held out; lower --max_eval_samples",
           tmp_path / "out")
