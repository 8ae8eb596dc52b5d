"""The compute-dtype probe: fp32 unless the device runs bf16 natively and measurably faster."""

import torch

from k2lab.model import dtype as probe


def test_not_native_is_fp32_without_timing(monkeypatch):
    monkeypatch.setattr(probe, "native_bf16", lambda device: (False, "test: no bf16 unit"))
    monkeypatch.setattr(probe, "gemm_gflops", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    chosen, report = probe.compute_dtype.__wrapped__("cpu", 256, 64)
    assert chosen == torch.float32 and report["dtype"] == "float32" and "not native" in report["reason"]


def test_native_slow_bf16_is_fp32(monkeypatch):
    monkeypatch.setattr(probe, "native_bf16", lambda device: (True, "test"))
    monkeypatch.setattr(probe, "gemm_gflops", lambda dtype, *a, **k: 100.0 if dtype == torch.float32 else 105.0)
    chosen, report = probe.compute_dtype.__wrapped__("cpu", 256, 64)
    assert chosen == torch.float32 and report["bf16_speedup"] == 1.05


def test_this_machine_choice_follows_its_measurement():
    chosen, report = probe.compute_dtype("cpu", 512, 128)
    native, _ = probe.native_bf16(torch.device("cpu"))
    assert report["native_bf16"] == native
    if native:
        assert report["fp32_gflops"] > 0 and report["bf16_gflops"] > 0
        assert (chosen == torch.bfloat16) == (report["bf16_speedup"] >= probe.MARGIN)
    else:
        assert chosen == torch.float32
