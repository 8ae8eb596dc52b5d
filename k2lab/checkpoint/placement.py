"""Tensor placement: which checkpoint name goes where in a model, the checks on names and tensors, and placing.

Module names of k2lab's models are the released checkpoint names, except the routed experts: k2lab stacks them
into one [E, N, K] tensor per projection, the checkpoint stores `experts.E.<proj>.weight` per expert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from k2lab.checkpoint.files import CheckpointError

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
# Tensors whose precision the router depends on: kept in float32 whatever the model dtype (as in transformers).
FP32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


@dataclass
class Slot:
    """Where one checkpoint tensor goes: `module.<attr>`, or row `expert` of a stacked expert tensor."""

    module: nn.Module
    module_name: str
    attr: str
    shape: tuple[int, ...]
    expert: int | None = None
    is_param: bool = True


def targets(model: nn.Module, prefix: str = "") -> dict[str, Slot]:
    """Checkpoint name -> slot for every persistent tensor of `model` (experts split per expert)."""
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
                    out[f"{prefix}{m[1]}.{e}.{m[2]}.weight"] = Slot(module, mod_name, attr, tuple(tensor.shape[1:]), e)
            else:
                out[prefix + name] = Slot(module, mod_name, attr, tuple(tensor.shape), None, is_param)
    return out


def check_names(expected, stored, path: Path, why_unexpected: str) -> None:
    """Every expected tensor name is stored and nothing else is; the error shows the first few of each."""
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from {path}, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensors in {path} ({why_unexpected}), "
                              f"e.g. {unexpected[:3]}")


def check_tensor(name: str, t: torch.Tensor, slot: Slot) -> None:
    if tuple(t.shape) != slot.shape:
        raise CheckpointError(f"{name} has shape {tuple(t.shape)}, the config implies {slot.shape}")
    if not t.is_floating_point():
        raise CheckpointError(f"{name} has dtype {t.dtype}; a floating-point tensor is expected")
    if name.endswith("e_score_correction_bias") and t.dtype != torch.float32:
        raise CheckpointError(f"{name} is {t.dtype}; the routing bias must be stored in float32 (its "
                              "updates are far below bf16 resolution)")


def resolve_device(module_name: str, device: torch.device | str, device_map: dict[str, str] | None) -> torch.device:
    """The device of the longest `device_map` prefix that names `module_name` (or a parent), else `device`."""
    if device_map:
        best = max((p for p in device_map if module_name == p or module_name.startswith(p + ".")), key=len,
                   default=None)
        if best is not None:
            return torch.device(device_map[best])
    return torch.device(device)


def place(slot: Slot, t: torch.Tensor) -> None:
    """Put `t` (already on its device and dtype) into the slot; stacked experts are allocated on first use."""
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
