"""Test configuration.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``), which must be
set before any ``@triton.jit`` function is defined; kernel tests call the Triton paths explicitly. ``LITESPARK_UNPAD_CPU=1``
keeps padded batches unpadded on the CPU too (see litespark_hf/unpadding.py). Tests marked
``gpu`` are skipped without CUDA (run them on the device machine: ``pytest -m gpu``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The unpadded decoder (litespark_hf.unpadding) runs by default only where the attention kernel does (CUDA); the CPU
# tests keep exercising it, since it is the path every padded batch takes on the GPU.
os.environ.setdefault("LITESPARK_UNPAD_CPU", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine with -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
