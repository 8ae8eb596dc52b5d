"""INT4 checkpoints: the released tensors and config, loading into packed experts, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig

import k2lab
from k2lab.checkpoint import CheckpointError
from k2lab.model import Experts
from k2lab.quant import format as ct
from k2lab.quant.checkpoint import quantize_experts_
from k2lab.quant.experts import Int4Experts
from tests.conftest import random_model, read_checkpoint_tensors, tiny_config

EXPERT = "model.layers.1.mlp.experts.3.down_proj"
SCHEME = QuantizationConfig.model_validate(ct.quantization_config()).config_groups["group_0"]


def decompress(tensors, linear):
    """compressed-tensors' dequantization of one stored Linear (the reference for what the checkpoint means)."""
    return PackedQuantizationCompressor.decompress({s: tensors[f"{linear}.{s}"] for s in ct.SUFFIXES}, SCHEME)["weight"]


@pytest.fixture(scope="module")
def int4_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("int4")
    q = quantize_experts_(random_model(tiny_config()))
    k2lab.save_model(q, path, max_shard_size="200KB")
    return q, path



def test_released_layout_and_config(int4_ckpt):
    _, path = int4_ckpt
    cfg = tiny_config()
    tensors = read_checkpoint_tensors(path)
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    assert tensors[f"{EXPERT}.weight_packed"].dtype == torch.int32
    assert tensors[f"{EXPERT}.weight_packed"].shape == (d, i // 8)
    assert tensors[f"{EXPERT}.weight_scale"].dtype == torch.bfloat16
    assert tensors[f"{EXPERT}.weight_scale"].shape == (d, i // 32)
    assert tensors[f"{EXPERT}.weight_shape"].tolist() == [d, i]
    assert f"{EXPERT}.weight" not in tensors
    assert tensors["model.layers.1.mlp.shared_experts.down_proj.weight"].is_floating_point()
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
        "dynamic": False, "observer": "minmax"}
    assert qc["ignore"] == ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                            r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
    n_quantized = sum(k.endswith("weight_packed") for k in tensors)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"][0] == cfg.eos_token_id
    assert n_quantized == 3 * cfg.n_routed_experts * sum(map(cfg.is_moe_layer, range(cfg.num_hidden_layers)))


def test_load_keeps_experts_packed_and_reproduces_the_model(int4_ckpt):
    q, path = int4_ckpt
    loaded = k2lab.load_model(path)
    assert isinstance(loaded.model.layers[1].mlp.experts, Int4Experts)
    assert not any(p.dtype == torch.int32 for p in loaded.parameters())
    ids = torch.randint(0, 500, (2, 12))
    cfg = tiny_config()
    calls = []  # (layer, its inputs, its output) for every MoE layer of one forward
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    hooks = [loaded.model.layers[i].mlp.experts.register_forward_hook(
        lambda mod, args, out, i=i: calls.append((i, args, out))) for i in moe_layers]
    tensors = read_checkpoint_tensors(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids), q(ids))
        for h in hooks:
            h.remove()
        assert len(calls) == 2
        # On the model's own activations and routing, INT4 compute equals full-precision experts holding the
        # weights compressed-tensors decompresses from the checkpoint, to bf16 precision (W4A16: activations go
        # through bf16).
        for layer, args, out in calls:
            ref = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
            for p in ("gate_proj", "up_proj", "down_proj"):
                linears = [f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(cfg.n_routed_experts)]
                getattr(ref, p).data = torch.stack([decompress(tensors, n) for n in linears]).float()
            expected = ref(*args)
            assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_resave_of_loaded_int4_is_bit_exact(int4_ckpt, tmp_path):
    _, path = int4_ckpt
    k2lab.save_model(k2lab.load_model(path), tmp_path)
    a, b = read_checkpoint_tensors(path), read_checkpoint_tensors(tmp_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _corrupt(src, dst, edit_config=None, edit_tensors=None):
    """Copy the checkpoint at src to dst with config.json and/or the shard holding EXPERT edited."""
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        fname = index["weight_map"][f"{EXPERT}.weight_packed"]
        tensors = load_file(dst / fname)
        edit_tensors(tensors)
        save_file(tensors, dst / fname, metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != fname}
        index["weight_map"].update({k: fname for k in tensors})
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def _set_group_size(qc):
    qc["config_groups"]["group_0"]["weights"]["group_size"] = 64


@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (_set_group_size, None, r"weight_scale has shape .* group_size 64"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=8), None, "num_bits is 8"),
    (lambda qc: qc.update(format="float-quantized"), None, "format is 'float-quantized'"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=48), None, "group_size is 48"),
    (lambda qc: qc["ignore"].remove("re:.*shared_experts.*"), None, "shared_experts.*full precision"),
    (lambda qc: qc["ignore"].append("re:.*experts.*"), None, "ignore excludes it"),
    (None, lambda t: t.pop(f"{EXPERT}.weight_scale"), f"missing {EXPERT}.weight_scale"),
    (None, lambda t: t.update({f"{EXPERT}.weight_packed": t[f"{EXPERT}.weight_packed"][:, :-1].contiguous()}),
     r"weight_packed has shape \(64, 3\), expected \(64, 4\)"),
    (None, lambda t: t.update({f"{EXPERT}.weight_shape": torch.tensor([64, 40])}), "not a multiple of group_size"),
    (None, lambda t: t.update({f"{EXPERT}.weight_packed": t[f"{EXPERT}.weight_packed"].float()}), "must be int32"),
])
def test_config_disagreeing_with_tensors_is_a_clear_error(int4_ckpt, tmp_path, edit_config, edit_tensors, message):
    _, path = int4_ckpt
    bad = _corrupt(path, tmp_path, edit_config, edit_tensors)
    with pytest.raises(CheckpointError, match=message):
        k2lab.load_model(bad)


def test_quantized_tensors_outside_experts_are_rejected(int4_ckpt, tmp_path):
    _, path = int4_ckpt
    name = "model.layers.1.self_attn.o_proj"

    def quantize_o_proj(t):
        for k, v in ct.compress(t.pop(f"{name}.weight")).items():
            t[f"{name}.{k}"] = v

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    bad = _corrupt(path, tmp_path)
    fname = index[f"{name}.weight"]
    tensors = load_file(bad / fname)
    quantize_o_proj(tensors)
    save_file(tensors, bad / fname, metadata={"format": "pt"})
    new_index = {k: v for k, v in index.items() if k != f"{name}.weight"}
    new_index.update({f"{name}.{s}": fname for s in ct.SUFFIXES})
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_index}))
    with pytest.raises(CheckpointError, match="ignore excludes it"):
        k2lab.load_model(bad)


def test_int4_load_refuses_other_devices(int4_ckpt):
    with pytest.raises(CheckpointError, match="device 'cpu'"):
        k2lab.load_model(int4_ckpt[1], device="meta")


def test_bytes_ratio_on_a_loaded_model(int4_ckpt):
    loaded = k2lab.load_model(int4_ckpt[1])
    experts = [m for m in loaded.modules() if isinstance(m, Int4Experts)]
    n_weights = sum(3 * e.n_experts * e.shapes["gate_proj"][0] * e.shapes["gate_proj"][1] for e in experts)
    assert sum(e.weight_bytes() for e in experts) / (2 * n_weights) == 4.5 / 16


def test_compress_decompresses_with_compressed_tensors_to_hand_computed_values():
    w = torch.zeros(16, 32)
    w[0, :4] = torch.tensor([3.0, -3.0, 1.0, 0.6])  # max 3: scale 3 / 7.5 = 0.4 -> bf16 0.400390625
    w[1, :3] = torch.tensor([-7.5, 7.5, 2.5])  # scale exactly 1
    w[2:] = torch.randn(14, 32)
    stored = ct.compress(w)
    weight = PackedQuantizationCompressor.decompress(stored, SCHEME)["weight"].float()
    # 3 / s = 7.49 -> 7, 1 / s = 2.498 -> 2, 0.6 / s = 1.499 -> 1; compressed-tensors returns q * s in bf16
    assert torch.equal(weight[0, :4], (torch.tensor([7.0, -7.0, 2.0, 1.0]) * 0.400390625).bfloat16().float())
    assert not weight[0, 4:].any()
    assert weight[1, :3].tolist() == [-8.0, 7.0, 2.0]  # -7.5 and 2.5 round half to even; 7.5 clamps to 7
    assert torch.equal(ct.decompress("x", stored, 32).bfloat16(), weight.bfloat16())


def test_kimi_k25_wrapper_round_trip(tmp_path):
    """K2.5/K2.6 checkpoints hold the text model under `language_model.`; the INT4 path keeps that prefix."""
    model = quantize_experts_(random_model(tiny_config().as_wrapper()))
    k2lab.save_model(model, tmp_path)
    assert f"language_model.{EXPERT}.weight_packed" in read_checkpoint_tensors(tmp_path)
    loaded = k2lab.load_model(tmp_path)
    ids = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
