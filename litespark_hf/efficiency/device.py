"""A short device tag for benchmark result file names (``train_bench_llama-1b_h100.json``, ``attention_h200.png``).

`device_tag` maps a device name, by default ``torch.cuda.get_device_name()``, to its model in lower case:
"NVIDIA H100 80GB HBM3" -> ``h100``, "NVIDIA H200" -> ``h200``, "NVIDIA A100-SXM4-80GB" -> ``a100``,
"NVIDIA GeForce RTX 4090" -> ``rtx4090``, "AMD Instinct MI300X" -> ``mi300x``; no CUDA device -> ``cpu``.
"""

from __future__ import annotations

import re

__all__ = ["device_tag"]

# words of a device name that name the vendor or the product line, not the model
_BRAND_WORDS = {"nvidia", "amd", "intel", "tesla", "geforce", "quadro", "instinct", "radeon", "pro", "graphics"}


def _current_device_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - a missing driver means: no GPU
        pass
    return None


def device_tag(device_name: str | None = None) -> str:
    """Short lower-case tag of ``device_name`` (default: the current CUDA device; ``cpu`` without one).

    The first word that is not a vendor or product-line word, reduced to ``[a-z0-9]``; an RTX/GTX model keeps
    its number (``rtx4090``). A name that starts with "CPU" gives ``cpu``; one with nothing left gives ``gpu``.
    """
    if device_name is None:
        device_name = _current_device_name()
    if not device_name or not device_name.strip():
        return "cpu"
    words = [w for w in re.split(r"[\s\-_/(),]+", device_name.lower()) if w and w not in _BRAND_WORDS]
    if not words:
        return "gpu"
    if words[0] == "cpu":
        return "cpu"
    tag = words[0]
    if tag in ("rtx", "gtx") and len(words) > 1:
        tag += words[1]
    return re.sub(r"[^a-z0-9]", "", tag) or "gpu"
