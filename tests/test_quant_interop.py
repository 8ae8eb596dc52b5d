"""Interop with the compressed-tensors library (the reference for the released INT4 format), both directions."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from compressed_tensors.utils.match import match_name
from safetensors.torch import save_file

import k2lab
from k2lab.checkpoint import state_dict_to_hf
from k2lab.quant import format as ct
from k2lab.quant import int4
from k2lab.quant.checkpoint import quantize_experts_
from k2lab.quant.experts import PROJS, Int4Experts
from tests.conftest import random_model, read_checkpoint_tensors, tiny_config


def _scheme(qc: dict):
    """compressed-tensors' own parse of a quantization_config -> the scheme of its one group."""
    config = QuantizationConfig.model_validate(qc)
    return config, config.config_groups["group_0"]



def test_k2lab_checkpoint_decompresses_with_compressed_tensors(tmp_path):
    model = quantize_experts_(random_model(tiny_config()))
    k2lab.save_model(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    config, scheme = _scheme(qc)
    assert config.format == "pack-quantized" and config.quantization_status == "compressed"
    tensors = read_checkpoint_tensors(tmp_path)
    linears = {k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")}
    assert linears
    for name in linears:
        local = {s: tensors[f"{name}.{s}"] for s in ct.SUFFIXES}
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        ours = ct.decompress(name, local, 32)
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, ours.to(torch.bfloat16)), name  # bf16 product of q and a bf16 scale
    # ... and they are the weights the loaded model computes with.
    experts = k2lab.load_model(tmp_path).model.layers[2].mlp.experts
    for p, w in zip(PROJS, experts.dequantized()):
        local = {s: tensors[f"model.layers.2.mlp.experts.5.{p}.{s}"] for s in ct.SUFFIXES}
        assert torch.equal(PackedQuantizationCompressor.decompress(local, scheme)["weight"], w[5].bfloat16())


def test_ignore_list_selects_exactly_the_routed_experts():
    """Under compressed-tensors' matching, the Linears the config leaves quantized are the routed experts."""
    names = [n.removesuffix(".weight") for n, _ in state_dict_to_hf(random_model(tiny_config()))
             if n.endswith("_proj.weight") or n == "lm_head.weight"]
    assert any(".experts." in n and "shared" not in n for n in names)
    for name in names:
        theirs = any(match_name(name, t) for t in ct.IGNORE)
        assert theirs == ct.is_ignored(name)
        assert theirs == (".mlp.experts." not in name), name


@pytest.mark.parametrize("seed", [0, 1])
def test_compressed_tensors_output_loads_in_k2lab(tmp_path, seed):
    """compressed-tensors quantizes (its minmax qparams) and packs the bf16 experts; k2lab loads the result."""
    model = random_model(tiny_config(), seed=seed)
    qc = ct.quantization_config()
    config, scheme = _scheme(qc)
    tensors = {}
    for name, t in state_dict_to_hf(model):
        if ".mlp.experts." not in name:
            tensors[name] = t.detach().clone()
            continue
        w = t.detach().to(torch.bfloat16)
        groups = w.unflatten(-1, (w.shape[-1] // 32, 32))
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
        local = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale,
                                                      "weight_zero_point": zero}, scheme)
        assert set(local) == set(ct.SUFFIXES)
        # The same bf16 weight quantized by k2lab gives the same bits.
        q, our_scale = int4.quantize(w)
        assert torch.equal(local["weight_scale"], our_scale) and torch.equal(local["weight_packed"], int4.pack(q))
        tensors.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in local.items()})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**model.config.to_dict(), "quantization_config": config.model_dump()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = k2lab.load_model(tmp_path)
    experts = loaded.model.layers[1].mlp.experts
    assert isinstance(experts, Int4Experts)
    for p, w in zip(PROJS, experts.dequantized()):
        for e in range(experts.n_experts):
            base = f"model.layers.1.mlp.experts.{e}.{p}"
            local = {s: tensors[f"{base}.{s}"] for s in ct.SUFFIXES}
            assert torch.equal(PackedQuantizationCompressor.decompress(local, scheme)["weight"], w[e].bfloat16())
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randint(0, 500, (1, 8)))).all()
