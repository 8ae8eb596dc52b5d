"""INT4 models and compressed-tensors checkpoints: PTQ, saving, and loading with the experts kept packed.

`k2lab.load_model` / `k2lab.save_model` hand INT4 checkpoints and models to `load_int4_model` /
`save_int4_model`. Everything but the routed experts goes through the generic checkpoint code; the experts'
`weight_packed` / `weight_scale` / `weight_shape` are checked against `quantization_config` (group size, shapes,
the ignore list) and become `Int4Experts` without ever being expanded to full precision.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from k2lab.checkpoint import hf
from k2lab.checkpoint.hf import CheckpointError
from k2lab.config import ModelConfig
from k2lab.model import Experts, K2ForCausalLM, MoE
from k2lab.quant import format as ct
from k2lab.quant.experts import PROJS, Int4Experts

_QUANT_TENSOR = re.compile(r"^(.*)\.(weight_packed|weight_scale|weight_shape)$")
_EXPERT_LINEAR = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_LINEAR = re.compile(r"^(.*_proj|lm_head)\.weight$")  # the nn.Linear weights of the HF DeepseekV3 modules


def quantize_experts_(model: K2ForCausalLM) -> K2ForCausalLM:
    """Quantize in place: every routed `Experts` (or QAT's, from its latent weights) becomes `Int4Experts`."""
    for moe in model.modules():
        if isinstance(moe, MoE) and isinstance(moe.experts, Experts):
            ex = moe.experts
            with torch.no_grad():
                moe.experts = Int4Experts.from_weights(*(w.detach().float().cpu()
                                                         for w in (ex.gate_proj, ex.up_proj, ex.down_proj)))
    return model


def has_int4_experts(model: nn.Module) -> bool:
    return any(isinstance(m, Int4Experts) for m in model.modules())


def is_int4_checkpoint(path: str | Path) -> bool:
    file = Path(path) / "config.json"
    return file.is_file() and "quantization_config" in json.loads(file.read_text())


def _hf_tensors(model: K2ForCausalLM):
    """(name, tensor) in the released layout, INT4 experts as per-expert pack-quantized Linears."""
    prefix = hf.prefix_of(model.config)
    int4 = {name: m for name, m in model.named_modules() if isinstance(m, Int4Experts)}
    skip = tuple(f"{prefix}{name}." for name in int4)
    for name, t in hf.state_dict_to_hf(model):
        if not name.startswith(skip):
            yield name, t
    for name, module in int4.items():
        for p, (packed, scale) in module.compressed().items():
            n, k = module.shapes[p]
            for e in range(module.n_experts):
                base = f"{prefix}{name}.{e}.{p}"
                yield f"{base}.weight_packed", packed[e]
                yield f"{base}.weight_scale", scale[e]
                yield f"{base}.weight_shape", torch.tensor([n, k], dtype=torch.int64)


def save_int4_model(model: K2ForCausalLM, path: str | Path, max_shard_size: int | str = "2GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Write a model with INT4 experts as a compressed-tensors pack-quantized checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = hf._parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in _hf_tensors(model):
        if t.is_floating_point() and not name.endswith(hf._FP32 + ("weight_scale",)):
            t = t.to(dtype or t.dtype)
        t = t.detach().to("cpu").clone().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        hf._atomic_write(path / fname, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    config = {**model.config.to_dict(), "quantization_config": ct.quantization_config()}
    hf._atomic_write(path / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    generation = json.dumps(hf.generation_config(model.config), indent=2)
    hf._atomic_write(path / "generation_config.json", lambda p: p.write_text(generation))
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    hf._atomic_write(path / hf.INDEX, lambda p: p.write_text(index))
    for stale in path.glob("model*.safetensors"):
        if stale.name not in set(weight_map.values()):
            stale.unlink()
    return path


def _check_ignore_list(names: list[str], quantized: set[str], ignore: list[str], prefix: str) -> None:
    """The config's ignore list must agree with which Linears the checkpoint actually stores packed."""
    def ignored(module: str) -> bool:  # a wrapper's list may name modules with or without its prefix
        return ct.is_ignored(module, ignore) or ct.is_ignored(prefix + module, ignore)

    for module in sorted(quantized):
        if ignored(module):
            raise CheckpointError(f"{module} is stored pack-quantized but quantization_config.ignore excludes it")
    for name in names:
        m = _LINEAR.match(name)
        if m and not ignored(m[1]):
            raise CheckpointError(f"{name} is stored in full precision but quantization_config does not "
                                  f"ignore {m[1]}: the config says it is pack-quantized")


def load_int4_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    device_map: dict[str, str] | None = None) -> K2ForCausalLM:
    """Load a compressed-tensors pack-quantized K2 checkpoint; routed experts stay INT4 (`Int4Experts`)."""
    path = Path(path)
    if torch.device(device).type != "cpu" or device_map:
        raise CheckpointError(f"INT4 experts compute with torch's CPU int4 kernel; load {path} on device 'cpu'")
    raw = json.loads((path / "config.json").read_text())
    qc = raw["quantization_config"]
    try:
        group_size = ct.read_quantization_config(qc)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    config = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    for m in moes.values():  # the experts are built from their packed tensors below
        m.experts = nn.Module()
    prefix = hf.prefix_of(config)
    weight_map = {k: v for k, v in hf._read_weight_map(path).items()
                  if not k.startswith(hf._OTHER_COMPONENTS) and not hf._is_mtp(k, config)}
    packed_names = {k for k in weight_map if _QUANT_TENSOR.match(k)}
    plain = sorted(set(weight_map) - packed_names)
    quantized = {_QUANT_TENSOR.match(k)[1].removeprefix(prefix) for k in packed_names}
    _check_ignore_list([k.removeprefix(prefix) for k in plain], quantized, qc.get("ignore") or [], prefix)
    stray = sorted(q for q in quantized if not _EXPERT_LINEAR.match(q))
    if stray:
        raise CheckpointError(f"pack-quantized tensors outside the routed experts (k2lab quantizes experts only), "
                              f"e.g. {stray[:3]}")
    targets = hf._targets(model)
    hf.check_names(targets, plain, path, "routed experts must be pack-quantized")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in weight_map:
        by_file[weight_map[name]].append(name)
    expert_tensors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # Linear name -> local tensors
    for fname in sorted(by_file):
        with hf._open(path / fname) as f:
            for name in by_file[fname]:
                t = f.get_tensor(name)
                m = _QUANT_TENSOR.match(name)
                if m:
                    expert_tensors[m[1].removeprefix(prefix)][m[2]] = t
                    continue
                slot = targets[name]
                hf._check(name, t, slot)
                hf._place(slot, t.to(dtype=torch.float32 if name.endswith(hf._FP32) else (dtype or t.dtype)))
    extra = sorted(set(expert_tensors) - {f"{n}.experts.{e}.{p}" for n in moes
                                          for e in range(config.n_routed_experts) for p in PROJS})
    if extra:
        raise CheckpointError(f"{len(extra)} pack-quantized Linears the config has no room for "
                              f"(n_routed_experts {config.n_routed_experts}, MoE layers), e.g. {extra[:3]}")
    for name, moe in moes.items():  # layer by layer, releasing the read tensors as each becomes Int4Experts
        moe.experts = _build_experts(name, expert_tensors, config, group_size)
    model.model.rotary_emb.reset(torch.device("cpu"))
    return model.eval()


def _build_experts(moe_name: str, tensors: dict[str, dict[str, torch.Tensor]], config: ModelConfig,
                   group_size: int) -> Int4Experts:
    per_proj: dict[str, tuple[list, list]] = {p: ([], []) for p in PROJS}
    expected = {"gate_proj": (config.moe_intermediate_size, config.hidden_size),
                "up_proj": (config.moe_intermediate_size, config.hidden_size),
                "down_proj": (config.hidden_size, config.moe_intermediate_size)}
    for e in range(config.n_routed_experts):
        for p in PROJS:
            name = f"{moe_name}.experts.{e}.{p}"
            if name not in tensors:
                raise CheckpointError(f"{name}: no weight_packed / weight_scale / weight_shape in the checkpoint")
            try:
                shape = ct.check_tensors(name, tensors[name], group_size)
            except ValueError as err:
                raise CheckpointError(str(err)) from None
            if shape != expected[p]:
                raise CheckpointError(f"{name}.weight_shape is {list(shape)}, the config implies {list(expected[p])}")
            local = tensors.pop(name)
            per_proj[p][0].append(local["weight_packed"])
            per_proj[p][1].append(local["weight_scale"])
    return Int4Experts.from_compressed({p: (torch.stack(a), torch.stack(b)) for p, (a, b) in per_proj.items()})
