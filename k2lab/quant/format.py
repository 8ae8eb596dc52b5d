"""compressed-tensors `pack-quantized` on disk: per-Linear tensors and the `quantization_config` block.

A quantized Linear `P` is stored as `P.weight_packed` int32 [out, in/8], `P.weight_scale` bf16
[out, in/32] and `P.weight_shape` int64 [2] (= [out, in]) instead of `P.weight`. Only routed experts are
quantized; the ignore list below (the released one) keeps everything else in full precision.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from k2lab.quant import int4

IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def quantization_config() -> dict[str, Any]:
    """The `quantization_config` of config.json, as in the K2-Thinking / K2.5 / K2.6 releases."""
    weights = {"num_bits": int4.BITS, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": int4.GROUP_SIZE, "dynamic": False, "observer": "minmax"}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
    }


def read_quantization_config(qc: dict[str, Any]) -> int:
    """Check that `qc` describes the K2 INT4 scheme (the only one k2lab computes with); return its group size."""
    def bad(what: str) -> ValueError:
        return ValueError(f"quantization_config: {what}; k2lab reads compressed-tensors pack-quantized "
                          f"symmetric INT4 group-wise weights only")
    if qc.get("quant_method") != "compressed-tensors":
        raise bad(f"quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'")
    if qc.get("format") != "pack-quantized":
        raise bad(f"format is {qc.get('format')!r}, not 'pack-quantized'")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise bad(f"expected one config group, found {len(groups)}")
    group = next(iter(groups.values()))
    w = group.get("weights") or {}
    expected = {"num_bits": int4.BITS, "type": "int", "symmetric": True, "strategy": "group"}
    for key, value in expected.items():
        if w.get(key) != value:
            raise bad(f"weights.{key} is {w.get(key)!r}, expected {value!r}")
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise bad(f"{key} are quantized (W4A16 keeps activations in full precision)")
    group_size = w.get("group_size")
    if group_size not in (32, 64, 128, 256):  # the sizes torch's INT4 kernel takes; the releases use 32
        raise bad(f"weights.group_size is {group_size!r}, expected 32 (or 64, 128, 256)")
    return group_size


def match_name(name: str, target: str) -> bool:
    """compressed-tensors' rule: `re:` targets are regexes matched at the start of the name; others are exact."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def is_ignored(module_name: str, ignore: list[str] = IGNORE) -> bool:
    return any(match_name(module_name, t) for t in ignore)


def compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Linear weight [out, in] -> its pack-quantized tensors (local names)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
    q, scale = int4.quantize(w)
    return {"weight_packed": int4.pack(q), "weight_scale": scale,
            "weight_shape": torch.tensor(w.shape, dtype=torch.int64)}


def check_tensors(name: str, tensors: dict[str, torch.Tensor], group_size: int) -> tuple[int, int]:
    """Check one Linear's pack-quantized tensors against the config; return (out, in). `name` is its prefix."""
    missing = [s for s in SUFFIXES if s not in tensors]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(f'{name}.{s}' for s in missing)}")
    packed, scale, shape = (tensors[s] for s in SUFFIXES)
    if shape.numel() != 2:
        raise ValueError(f"{name}.weight_shape must hold [out, in], got {shape.tolist()}")
    out, inp = (int(v) for v in shape.tolist())
    if packed.dtype != torch.int32:
        raise ValueError(f"{name}.weight_packed must be int32, got {packed.dtype}")
    if not scale.is_floating_point():
        raise ValueError(f"{name}.weight_scale must be floating point, got {scale.dtype}")
    if inp % group_size:
        raise ValueError(f"{name}: input dimension {inp} is not a multiple of group_size {group_size}")
    if tuple(packed.shape) != (out, inp // int4.PER_WORD):
        raise ValueError(f"{name}.weight_packed has shape {tuple(packed.shape)}, expected "
                         f"{(out, inp // int4.PER_WORD)} for weight_shape {[out, inp]}")
    if tuple(scale.shape) != (out, inp // group_size):
        raise ValueError(f"{name}.weight_scale has shape {tuple(scale.shape)}, expected "
                         f"{(out, inp // group_size)} for weight_shape {[out, inp]} and group_size {group_size}")
    return out, inp


def decompress(name: str, tensors: dict[str, torch.Tensor], group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One Linear's pack-quantized tensors -> its dequantized weight [out, in]."""
    check_tensors(name, tensors, group_size)
    return int4.dequantize(int4.unpack(tensors["weight_packed"]), tensors["weight_scale"], dtype)
