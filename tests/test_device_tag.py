"""The device tag in benchmark result file names (`litespark_hf.efficiency.device.device_tag`)."""

import pytest

from litespark_hf.efficiency.device import device_tag


@pytest.mark.parametrize("name, tag", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA B200", "b200"),
    ("Tesla V100-SXM2-16GB", "v100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA RTX A6000", "rtxa6000"),
    ("AMD Instinct MI300X", "mi300x"),
    ("CPU (x86_64)", "cpu"),
    ("", "cpu"),
    ("NVIDIA", "gpu"),
])
def test_device_tag_of_a_name(name, tag):
    assert device_tag(name) == tag


def test_device_tag_of_this_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_tag() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert device_tag() == "h200"
