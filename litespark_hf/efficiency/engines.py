"""Sharding engines for the training benchmark (``litespark-train-bench --engine none|fsdp2|zero3``).

An engine is configured the way ``accelerate launch --config_file accelerate_configs/<engine>.yaml`` configures a
script: the launcher turns the YAML into environment variables (`ACCELERATE_ENV`, the same keys and values for these
two files), which accelerate's ``Accelerator`` (FSDP2) and transformers' ``TrainingArguments`` (DeepSpeed) read. A
run not started by a launcher gets the single-process distributed environment a launcher would give it
(`single_process_env`: rank 0 of world size 1), so both engines run at world size 1 with the same sharded parameter
types (DTensors, ZeRO-3 partitions) and the same hooks as on several GPUs.

On a CPU-only machine (the tests): DeepSpeed runs on its CPU accelerator (``DS_ACCELERATOR=cpu``) with gloo's
collectives (`decline_deepspeed_shm_comm`), and accelerate, which turns FSDP on only for GPU-like device types, is
told that this gloo CPU run is FSDP (`allow_fsdp_on_cpu`).
"""

from __future__ import annotations

import functools
import os
import socket

ENGINES = ("none", "fsdp2", "zero3")
ACCELERATE_CONFIGS = {"fsdp2": "accelerate_configs/fsdp2.yaml", "zero3": "accelerate_configs/deepspeed_zero3.yaml"}

# What `accelerate launch --config_file accelerate_configs/<file>` puts in the environment for these files
# (accelerate.utils.launch: prepare_multi_gpu_env for FSDP, prepare_deepspeed_cmd_env for DeepSpeed);
# ACCELERATE_MIXED_PRECISION is set from the run (see `engine_env`). tests/test_engine_bench.py checks these against
# the YAML files.
ACCELERATE_ENV = {
    "fsdp2": {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_OFFLOAD_PARAMS": "false",
        "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_SYNC_MODULE_STATES": "true",
    },
    "zero3": {
        "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "auto", "ACCELERATE_GRADIENT_CLIPPING": "auto",
    },
}
_LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(environ=os.environ) -> dict[str, str]:
    """The variables a launcher (torchrun, accelerate launch) sets for rank 0 of a world of 1 that ``environ`` lacks;
    empty when it was launched (``RANK`` or ``LOCAL_RANK`` set)."""
    if "RANK" in environ or "LOCAL_RANK" in environ:
        return {}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}


def engine_env(engine: str, mixed_precision: str, cuda: bool, environ=os.environ) -> dict[str, str]:
    """Every variable to set for ``engine`` ("fsdp2", "zero3"; "none": nothing) in a process whose environment is
    ``environ``: accelerate's, the launcher's where missing, and DeepSpeed's CPU accelerator on a CPU-only run."""
    if engine == "none":
        return {}
    if engine not in ACCELERATE_ENV:
        raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")
    env = {**single_process_env(environ), **ACCELERATE_ENV[engine], "ACCELERATE_MIXED_PRECISION": mixed_precision}
    if engine == "zero3" and not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's state take a gloo CPU run as FSDP: it sets ``DistributedType.FSDP`` only for GPU-like
    device types (accelerate/state.py), and leaves a CPU run with an FSDP plugin ``NO`` or ``MULTI_CPU``."""
    import accelerate.state as st
    from accelerate.utils import DistributedType

    init = st.AcceleratorState.__init__
    if getattr(init, "_fsdp_on_cpu", False):
        return

    @functools.wraps(init)
    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.NO):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    patched._fsdp_on_cpu = True
    st.AcceleratorState.__init__ = patched


def enter(engine: str, mixed_precision: str, cuda: bool) -> dict[str, str]:
    """Configure this process for ``engine`` (before ``TrainingArguments`` is made); returns what was set."""
    env = engine_env(engine, mixed_precision, cuda)
    os.environ.update(env)
    if engine == "fsdp2" and not cuda:
        allow_fsdp_on_cpu()
    if engine == "zero3" and not cuda:
        decline_deepspeed_shm_comm()
    return env


def decline_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed's CPU accelerator on gloo's collectives: its shared-memory all-reduce is a C++ op compiled at
    the first ``init_distributed`` (about 2 minutes on 2 cores, needs a compiler), marked incompatible here instead.
    DeepSpeed then uses torch.distributed's gloo ops; the results are the same."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def describe(trainer, model) -> dict:
    """What the trainer ran under, read off the trained objects: the FSDP2 units (modules ``fully_shard`` made), the
    ZeRO stage, the world size, the optimizer doing the step, and (ZeRO-3) how many child weights the fused modules
    registered (`litespark_hf.sharding`)."""
    acc = trainer.accelerator
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        FSDPModule = ()
    info = {"world_size": acc.num_processes, "fsdp2_units": sum(isinstance(m, FSDPModule) for m in model.modules())}
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and plugin is not None:
        info["zero_stage"] = plugin.zero_stage
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's AcceleratedOptimizer
    info["optimizer"] = type(opt).__name__
    wrapped = getattr(opt, "optimizer", None)  # DeepSpeed's ZeRO optimizer wraps the Trainer's torch optimizer
    if wrapped is not None:
        info["optimizer_wrapped"] = type(wrapped).__name__
    info["zero3_registered_weights"] = sum(len(m.__dict__.get("_litespark_zero3_external", ()))
                                           for m in model.modules())
    return info
