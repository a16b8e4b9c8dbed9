import torch

from vitscope import device


def test_auto_precision_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})  # a Zen 3: bf16 would be emulated
    assert device.select_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # a Zen 4
    assert device.select_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(device, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})  # Sapphire Rapids
    assert device.select_precision("auto", cpu) == "bf16"


def test_forced_precision_is_respected_either_way(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2"})
    assert device.select_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512_bf16"})
    assert device.select_precision("fp32", cpu) == "fp32"


def test_auto_device_is_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device.select_device("auto") == torch.device("cpu")


def test_hardware_description_names_the_cpu():
    info = device.describe_hardware(torch.device("cpu"))
    assert info["cpu"] and info["torch"] == torch.__version__ and info["threads"] >= 1
