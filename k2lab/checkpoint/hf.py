"""Hugging Face checkpoints: sharded safetensors with the exact tensor names of the released K2 weights.

Loading is lazy: the model is built on the meta device, shards are memory-mapped and each tensor is
materialized straight onto the device of the layer that owns it, so no full copy of the checkpoint is ever held
in memory. Every tensor is checked (presence, shape, dtype) before anything is placed: a bad checkpoint fails
with the key or file in the message, never with a silent partial load.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM

INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
# Present in released K2.5/K2.6 wrappers but not part of the text model; the vision stage reads them.
_OTHER_COMPONENTS = ("vision_tower.", "mm_projector.")
# Tensors whose precision the router depends on: kept in float32 whatever the model dtype (as in transformers).
_FP32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the key or file at fault."""


@dataclass
class Slot:
    """Where one checkpoint tensor goes: `module.<attr>`, or row `expert` of a stacked expert tensor."""

    module: nn.Module
    attr: str
    shape: tuple[int, ...]
    expert: int | None = None
    is_param: bool = True


def prefix_of(config: ModelConfig) -> str:
    return "language_model." if config.wrapper is not None else ""


def _targets(model: nn.Module) -> dict[str, Slot]:
    """Checkpoint name -> slot for every persistent tensor of the model (experts split per expert)."""
    prefix = prefix_of(model.config)
    out: dict[str, Slot] = {}
    for mod_name, module in model.named_modules():
        local = [(n, p, True) for n, p in module.named_parameters(recurse=False)]
        local += [(n, b, False) for n, b in module.named_buffers(recurse=False)
                  if n not in module._non_persistent_buffers_set]
        for attr, tensor, is_param in local:
            name = f"{mod_name}.{attr}" if mod_name else attr
            m = _EXPERT.match(name)
            if m and tensor.dim() == 3:
                for e in range(tensor.shape[0]):
                    out[f"{prefix}{m[1]}.{e}.{m[2]}.weight"] = Slot(module, attr, tuple(tensor.shape[1:]), e)
            else:
                out[prefix + name] = Slot(module, attr, tuple(tensor.shape), None, is_param)
    return out


def state_dict_to_hf(model: nn.Module):
    """Yield (checkpoint name, tensor) in the released layout; expert rows are views of the stacked tensor."""
    for name, slot in _targets(model).items():
        t = getattr(slot.module, slot.attr)
        yield name, (t[slot.expert] if slot.expert is not None else t)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '2GB' or '500MB'")
    unit = (m[2] or "B").upper().replace("I", "")
    return int(float(m[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(model: nn.Module, path: str | Path, max_shard_size: int | str = "2GB",
               dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model-XXXXX-of-YYYYY.safetensors and the index; each file atomically, index last."""
    from k2lab.quant.checkpoint import has_int4_experts, save_int4_model
    if has_int4_experts(model):  # compressed-tensors pack-quantized experts (k2lab.quant)
        return save_int4_model(model, path, max_shard_size, dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in state_dict_to_hf(model):
        keep_fp32 = name.endswith(_FP32)
        t = t.detach().to(torch.float32 if keep_fp32 else (dtype or t.dtype))
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: t.to("cpu").clone().contiguous() for n, t in shard}  # clone: rows of one expert tensor
        _atomic_write(path / fname, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    config_json = json.dumps(model.config.to_dict(), indent=2)
    _atomic_write(path / "config.json", lambda p: p.write_text(config_json))
    generation = json.dumps(generation_config(model.config), indent=2)
    _atomic_write(path / "generation_config.json", lambda p: p.write_text(generation))
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    _atomic_write(path / INDEX, lambda p: p.write_text(index))
    for stale in path.glob("model*.safetensors"):  # shards of an earlier save with another shard count
        if stale.name not in set(weight_map.values()):
            stale.unlink()
    return path


def generation_config(config: ModelConfig) -> dict:
    """Stop at [EOS] and at <|im_end|> (the end of a chat turn, vocab_size - 254 in the K2 special-token layout),
    so transformers' and vLLM's generate end assistant turns."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": [config.eos_token_id, config.vocab_size - 254],
            "pad_token_id": config.pad_token_id}


def _read_weight_map(path: Path) -> dict[str, str]:
    index_file = path / INDEX
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file} is not a valid safetensors index: {e}") from None
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).is_file():
                raise CheckpointError(f"{index_file} points to {fname}, which does not exist in {path}")
        return weight_map
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has neither {INDEX} nor model.safetensors")
    with _open(single) as f:
        return {k: single.name for k in f.keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file.name}: {e} (truncated or not a safetensors file?)") from None


def _resolve_device(name: str, device: torch.device | str, device_map: dict[str, str] | None) -> torch.device:
    if device_map:
        best = max((p for p in device_map if name == p or name.startswith(p + ".")), key=len, default=None)
        if best is not None:
            return torch.device(device_map[best])
    return torch.device(device)


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               device_map: dict[str, str] | None = None) -> K2ForCausalLM:
    """Load a k2lab / Hugging Face K2 checkpoint directory.

    dtype None keeps each tensor's stored dtype; the router stays float32. device_map maps module-name prefixes
    (e.g. "model.layers.30") to devices, so layers can be placed across GPUs; others go to `device`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    from k2lab.quant.checkpoint import is_int4_checkpoint, load_int4_model
    if is_int4_checkpoint(path):  # compressed-tensors pack-quantized experts (k2lab.quant)
        return load_int4_model(path, device, dtype, device_map)
    config = ModelConfig.load(path)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    targets = _targets(model)
    weight_map = _read_weight_map(path)
    stored = {k: v for k, v in weight_map.items() if not k.startswith(_OTHER_COMPONENTS)
              and not _is_mtp(k, config)}
    check_names(targets, stored, path, "config/weights mismatch?")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, fname in stored.items():
        by_file[fname].append(name)
    module_names = {id(m): n for n, m in model.named_modules()}
    for fname in sorted(by_file):
        with _open(path / fname) as f:
            present = set(f.keys())
            for name in by_file[fname]:
                if name not in present:
                    raise CheckpointError(f"{fname} does not contain {name}, though {INDEX} says it does")
                slot = targets[name]
                try:
                    t = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"cannot read {name} from {fname}: {e}") from None
                _check(name, t, slot)
                target_dtype = torch.float32 if name.endswith(_FP32) else (dtype or t.dtype)
                dev = _resolve_device(module_names[id(slot.module)], device, device_map)
                _place(slot, t.to(device=dev, dtype=target_dtype))
    model.model.rotary_emb.reset(_resolve_device("model.layers.0", device, device_map))
    return model.eval()


def check_names(expected, stored, path: Path, why_unexpected: str) -> None:
    """Every expected tensor name is stored and nothing else is; the error shows the first few of each."""
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from {path}, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensors in {path} ({why_unexpected}), "
                              f"e.g. {unexpected[:3]}")


def _is_mtp(name: str, config: ModelConfig) -> bool:
    """Multi-token-prediction layers (beyond num_hidden_layers) are not part of the causal LM."""
    m = re.match(r"^(?:language_model\.)?model\.layers\.(\d+)\.", name)
    return bool(m) and int(m[1]) >= config.num_hidden_layers


def _check(name: str, t: torch.Tensor, slot: Slot) -> None:
    if tuple(t.shape) != slot.shape:
        raise CheckpointError(f"{name} has shape {tuple(t.shape)}, the config implies {slot.shape}")
    if not t.is_floating_point():
        raise CheckpointError(f"{name} has dtype {t.dtype}; a floating-point tensor is expected")
    if name.endswith("e_score_correction_bias") and t.dtype != torch.float32:
        raise CheckpointError(f"{name} is {t.dtype}; the routing bias must be stored in float32 (its "
                              "updates are far below bf16 resolution)")


def _place(slot: Slot, t: torch.Tensor) -> None:
    module, attr = slot.module, slot.attr
    current = getattr(module, attr)
    if slot.expert is None:
        new = t
    else:
        if current.is_meta:  # first expert seen: allocate the stacked tensor on its device
            current = torch.empty(current.shape, dtype=t.dtype, device=t.device)
        current.data[slot.expert].copy_(t)
        new = current
    if slot.is_param:
        setattr(module, attr, nn.Parameter(new, requires_grad=new.is_floating_point()))
    else:
        module._buffers[attr] = new
