"""``litespark-train-bench --engine none|fsdp2|zero3`` on the CPU (issue #20): the tiny config, variants sdpa and
litespark, each in its own subprocess at world size 1 (gloo), as the GPU run does it on the Llama-1B shape.

Checked: the result file names (``train_bench_tiny_<engine>_cpu.json``, the plain run keeps ``train_bench_tiny_cpu``),
the engine recorded in the file and in each variant, that the engine really ran (FSDP2 units, ZeRO stage 3 with
DeepSpeed's optimizer, the fused modules' registered weights), equal losses stock vs Litespark under each engine
and each engine vs no engine, and that the environment the bench sets is what ``accelerate launch`` makes of
``accelerate_configs/fsdp2.yaml`` and ``deepspeed_zero3.yaml``.

Measured on the 2-core CPU machine (fp32, 4 steps): stock and Litespark equal bit for bit under each engine, and
each engine equals no engine to 2e-7 relative. About 70 s in all (5 processes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from litespark_hf.efficiency import engines

pytestmark = pytest.mark.slow  # about 90 s on 2 CPU cores
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6  # stock vs Litespark under one engine, and an engine vs none (fp32, 4 Adam steps at lr 1e-4)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _bench(out: Path, engine: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # not launched: the bench sets up the world of one itself
    cmd = [sys.executable, "-m", "litespark_hf.efficiency.bench", "--tiny", "--variants", "sdpa,litespark",
           "--engine", engine, "--steps", "4", "--time-from", "2", "--out", str(out), "--no-progress"]
    if engine == "none":
        cmd.append("--no-isolate")  # nothing to isolate: one process for both variants
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    name = "train_bench_tiny_cpu.json" if engine == "none" else f"train_bench_tiny_{engine}_cpu.json"
    assert sorted(p.name for p in out.glob("*.json")) == [name]
    result = json.loads((out / name).read_text())
    assert result["engine"] == engine
    by = {v["name"]: v for v in result["variants"]}
    for v in by.values():
        assert v["status"] == "ok", v.get("traceback") or v.get("log_tail") or v
        assert v["engine"] == engine
    return by


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    wanted = ["none", "fsdp2"] + (["zero3"] if _has_deepspeed() else [])
    return {e: _bench(tmp_path_factory.mktemp(e), e) for e in wanted}


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_fsdp2_engine_bench(runs):
    by = runs["fsdp2"]
    for v in by.values():
        info = v["engine_info"]
        # fully_shard on each decoder layer, the embedding, [norm, lm_head] and the root (accelerate's layout)
        assert info["fsdp2_units"] >= 3 and info["world_size"] == 1, info
        assert info["optimizer"] == "AdamW" and info["zero3_registered_weights"] == 0
    assert by["litespark"]["litespark_swapped"]["attention"] == 2
    assert _rel(by["litespark"]["losses"], by["sdpa"]["losses"]) <= TOL
    assert _rel(by["sdpa"]["losses"], runs["none"]["sdpa"]["losses"]) <= TOL


def test_zero3_engine_bench(runs):
    if "zero3" not in runs:
        pytest.skip("DeepSpeed is the optional extra: pip install -e '.[deepspeed]'")
    by = runs["zero3"]
    for v in by.values():
        info = v["engine_info"]
        assert info["zero_stage"] == 3 and info["world_size"] == 1 and info["fsdp2_units"] == 0, info
        assert info["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and info["optimizer_wrapped"] == "AdamW", info
    assert by["sdpa"]["engine_info"]["zero3_registered_weights"] == 0
    assert by["litespark"]["engine_info"]["zero3_registered_weights"] == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert _rel(by["litespark"]["losses"], by["sdpa"]["losses"]) <= TOL
    assert _rel(by["sdpa"]["losses"], runs["none"]["sdpa"]["losses"]) <= TOL


def test_plain_run_keeps_its_file_name_and_records_no_engine(runs):
    assert all(v["engine_info"] is None for v in runs["none"].values())


# --------------------------------------------------------------------------------- the environment of the YAMLs
def test_engine_env_is_what_accelerate_launch_makes_of_the_yaml_files():
    fsdp = yaml.safe_load((ROOT / engines.ACCELERATE_CONFIGS["fsdp2"]).read_text())
    assert fsdp["distributed_type"] == "FSDP"
    env = engines.ACCELERATE_ENV["fsdp2"]
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in fsdp["fsdp_config"].items():  # accelerate.utils.launch.prepare_multi_gpu_env: FSDP_<KEY>
        assert env[key.upper()] == (str(value).lower() if isinstance(value, bool) else str(value)), key

    ds = yaml.safe_load((ROOT / engines.ACCELERATE_CONFIGS["zero3"]).read_text())
    assert ds["distributed_type"] == "DEEPSPEED"
    env = engines.ACCELERATE_ENV["zero3"]
    names = {"zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE", "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
             "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
             "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
             "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
             "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
             "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING"}
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    for key, value in ds["deepspeed_config"].items():  # prepare_deepspeed_cmd_env: str(value).lower()
        assert env[names[key]] == str(value).lower(), key


def test_single_process_env_only_when_not_launched():
    env = engines.single_process_env({})
    assert env["RANK"] == env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0
    assert engines.single_process_env({"LOCAL_RANK": "0"}) == {}
    assert engines.engine_env("none", "no", cuda=False) == {}
    assert engines.engine_env("zero3", "no", cuda=False, environ={"RANK": "0"})["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in engines.engine_env("zero3", "bf16", cuda=True, environ={"RANK": "0"})
    with pytest.raises(ValueError):
        engines.engine_env("fsdp1", "no", cuda=False)
