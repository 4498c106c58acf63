"""``--use_litespark`` for unchanged TRL scripts: `litespark_hf.patch_trl`, the ``litespark-run`` launcher
(`litespark_hf.run`) on the scripts shipped inside the installed ``trl`` package, and a litespark_hf config honoured
by a stock TRL trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import litespark_hf
from tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
TRL_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--bf16", "false",
            "--save_strategy", "no", "--logging_steps", "1", "--use_litespark"]


@pytest.fixture(scope="module")
def trl_inputs(tmp_path_factory):
    """A tiny Llama with its tokenizer, and local SFT (``text``) and DPO (``prompt``/``chosen``/``rejected``) jsonl
    datasets: TRL's scripts load them with ``--model_name_or_path DIR --dataset_name DIR``, offline."""
    root = tmp_path_factory.mktemp("trl_inputs")
    model = tiny_model("llama")
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = 0, 1
    model.generation_config.eos_token_id = 2
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "sft").mkdir()
    (root / "dpo").mkdir()
    with open(root / "sft" / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": " ".join(f"t{4 + (7 * i + j) % 120}" for j in range(12))}) + "\n")
    with open(root / "dpo" / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"t{5 + i} t{6 + i}", "chosen": f" t{10 + i} t{11 + i}",
                                "rejected": f" t{40 + i}"}) + "\n")
    return root


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _check_run(proc, output_dir: Path, applied: int):
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Litespark rewrote the model(s) inside TRL's trainer (logged by apply, with the swap counts) and the run finished
    lines = [line for line in proc.stderr.splitlines() if line.startswith("litespark applied to LlamaForCausalLM")]
    assert len(lines) == applied, proc.stderr[-4000:]
    assert all("'attention': 2" in line and "'rms_norm': 5" in line for line in lines)
    assert "Training completed" in proc.stdout
    assert (output_dir / "model.safetensors").exists()


def _trl_script(name: str) -> Path:
    import trl

    return Path(trl.__file__).parent / "scripts" / f"{name}.py"


def test_launcher_runs_trl_sft_script_with_the_flag(trl_inputs, tmp_path):
    # `litespark-run sft ...` through the console-script function (setup.cfg: litespark_hf.cli:run_main)
    out = tmp_path / "out"
    proc = _run(["-c", "import sys; from litespark_hf.cli import run_main; sys.exit(run_main())", "sft",
                 "--model_name_or_path", str(trl_inputs / "model"), "--dataset_name", str(trl_inputs / "sft"),
                 "--output_dir", str(out), *TRL_ARGS], cwd=tmp_path)
    _check_run(proc, out, applied=1)
    assert "litespark-run: patched trl.SFTConfig, trl.SFTTrainer" in proc.stderr


def test_launcher_runs_trl_dpo_script_by_path(trl_inputs, tmp_path):
    # `python -m litespark_hf.run path/to/trl/scripts/dpo.py ...`: the policy and the reference model are rewritten
    out = tmp_path / "out"
    proc = _run(["-m", "litespark_hf.run", str(_trl_script("dpo")), "--model_name_or_path",
                 str(trl_inputs / "model"), "--dataset_name", str(trl_inputs / "dpo"), "--output_dir", str(out),
                 *TRL_ARGS], cwd=tmp_path)
    _check_run(proc, out, applied=2)


def test_patch_trl_then_trls_own_sft_script(trl_inputs, tmp_path):
    # the notebook way: patch_trl(), then TRL's script module (its parser and trainer come from `trl` at call time)
    out = tmp_path / "out"
    code = ("import logging, runpy, litespark_hf; log = logging.getLogger('litespark_hf'); "
            "log.addHandler(logging.StreamHandler()); log.setLevel(logging.INFO); litespark_hf.patch_trl(); "
            "runpy.run_module('trl.scripts.sft', run_name='__main__', alter_sys=True)")
    proc = _run(["-c", code, "--model_name_or_path", str(trl_inputs / "model"), "--dataset_name",
                 str(trl_inputs / "sft"), "--output_dir", str(out), *TRL_ARGS], cwd=tmp_path)
    _check_run(proc, out, applied=1)


def _sft_parser_args():
    return ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "/tmp/unused", "--bf16", "false",
            "--use_litespark", "--litespark_config", '{"fused_cross_entropy": false}']


def test_patch_trl_gives_trls_parsers_the_flag_and_unpatch_restores(trl_inputs):
    import transformers
    import trl
    import trl.trainer
    from trl.scripts import dpo, sft
    from trl.trainer.sft_trainer import SFTTrainer as StockSFTTrainer

    stock = {name: getattr(trl, name) for name in ("SFTConfig", "SFTTrainer", "DPOConfig", "DPOTrainer")}
    stock_hf = (transformers.Trainer, transformers.TrainingArguments)
    # the issue: an unchanged TRL script rejects the flag
    with pytest.raises(ValueError, match="not used by the HfArgumentParser.*--use_litespark"):
        sft.make_parser().parse_args_and_config(_sft_parser_args(), fail_with_unknown_args=False)
    try:
        first = litespark_hf.patch_trl(warn_stale=False)
        assert litespark_hf.patch_trl(warn_stale=False) == first  # idempotent
        assert "trl.SFTTrainer" in first and "trl.trainer.DPOConfig" in first and "transformers.Trainer" in first
        for name in stock:
            assert getattr(trl, name) is getattr(trl.trainer, name) is getattr(litespark_hf, name)
        assert transformers.Trainer is litespark_hf.Trainer
        assert transformers.TrainingArguments is litespark_hf.TrainingArguments
        # no class subclasses itself: the bases are the stock classes, each once in the MRO
        assert litespark_hf.SFTTrainer.__bases__[-1] is StockSFTTrainer is stock["SFTTrainer"]
        assert litespark_hf.SFTTrainer.__mro__.count(StockSFTTrainer) == 1
        assert litespark_hf.Trainer.__bases__[-1] is stock_hf[0]

        _, args, _, _ = sft.make_parser().parse_args_and_config(_sft_parser_args(), fail_with_unknown_args=False)
        assert type(args) is litespark_hf.SFTConfig and args.use_litespark
        assert json.loads(args.litespark_config) == {"fused_cross_entropy": False}
        _, args, _, _ = dpo.make_parser().parse_args_and_config(_sft_parser_args(), fail_with_unknown_args=False)
        assert type(args) is litespark_hf.DPOConfig and args.use_litespark
    finally:
        restored = litespark_hf.unpatch_trl()
    assert set(restored) == set(first)
    assert {name: getattr(trl, name) for name in stock} == stock
    assert (transformers.Trainer, transformers.TrainingArguments) == stock_hf
    assert litespark_hf.unpatch_trl() == []  # nothing left to undo


def test_patch_trl_warns_about_names_imported_before_and_leaves_foreign_patches(tmp_path, monkeypatch):
    import trl

    (tmp_path / "early_user_script.py").write_text("from trl import SFTTrainer, DPOConfig\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import early_user_script  # noqa: F401  (holds the stock classes, as a script that imported trl first)

    try:
        with pytest.warns(UserWarning, match=r"early_user_script.DPOConfig, early_user_script.SFTTrainer were "
                                             r"imported before patching"):
            litespark_hf.patch_trl(transformers=False)
    finally:
        litespark_hf.unpatch_trl()
        sys.modules.pop("early_user_script", None)

    class OtherPatch(trl.SFTTrainer):  # another library's replacement: not overwritten
        pass

    monkeypatch.setattr(trl, "SFTTrainer", OtherPatch)
    try:
        with pytest.warns(UserWarning, match="trl.SFTTrainer is .*OtherPatch, not the stock class; leaving it"):
            rebound = litespark_hf.patch_trl(transformers=False, warn_stale=False)
        assert trl.SFTTrainer is OtherPatch and "trl.SFTTrainer" not in rebound and "trl.SFTConfig" in rebound
    finally:
        litespark_hf.unpatch_trl()


def test_launcher_cli_help_and_errors(capsys, tmp_path):
    from litespark_hf import run

    assert run.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: litespark-run" in out and "sft, dpo" in out and "-m MODULE" in out
    assert run.main(["grpo", "--use_litespark"]) == 2
    assert "not 'grpo'" in capsys.readouterr().err
    assert run.main(["--bogus", "sft"]) == 2
    assert run.main([]) == 2
    script = tmp_path / "train.py"
    script.write_text("")
    assert run.parse(["sft", "--use_litespark"])[1:] == ("module", "trl.scripts.sft", ["--use_litespark"])
    assert run.parse(["--quiet", "-m", "pkg.mod", "-m", "x"])[1:] == ("module", "pkg.mod", ["-m", "x"])
    assert run.parse([str(script), "--help"])[1:] == ("path", str(script), ["--help"])
    assert run.parse(["--no-transformers", str(script)])[0]["transformers"] is False


def test_a_stock_trl_trainer_honours_a_litespark_config(tmp_path):
    from datasets import Dataset
    from trl.trainer.sft_trainer import SFTTrainer as StockSFTTrainer

    import litespark_hf.trainer as lt

    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(3, 128, (8, 16), generator=g).tolist()})
    args = litespark_hf.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                  bf16=False, use_cpu=True, report_to=[], save_strategy="no", use_litespark=True)
    lt._STOCK_WARNED.discard(StockSFTTrainer)
    trainer = StockSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=ds,
                              processing_class=tiny_tokenizer())
    with pytest.warns(UserWarning, match="stock SFTTrainer: the Litespark model layers are applied.*trainer-side "
                                         "features .*need litespark_hf's trainer classes"):
        trainer.train()
    counts = litespark_hf.swapped_counts(trainer.model)
    assert counts.get("attention") == 2 and counts.get("rms_norm") == 5

    # litespark_hf's own trainer: the same layers, no such warning
    args = litespark_hf.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                  bf16=False, use_cpu=True, report_to=[], save_strategy="no", use_litespark=True)
    trainer = litespark_hf.SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=ds,
                                      processing_class=tiny_tokenizer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not any("stock" in str(w.message) and "trainer-side" in str(w.message) for w in caught)
    assert litespark_hf.swapped_counts(trainer.model).get("attention") == 2

    # a stock config keeps a stock trainer stock
    from trl.trainer.sft_config import SFTConfig as StockSFTConfig

    stock_args = StockSFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, bf16=False,
                                use_cpu=True, report_to=[], save_strategy="no")
    trainer = StockSFTTrainer(model=tiny_model("llama"), args=stock_args, train_dataset=ds,
                              processing_class=tiny_tokenizer())
    trainer.train()
    assert not litespark_hf.is_applied(trainer.model)
