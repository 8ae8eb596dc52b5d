"""K2.5/K2.6 multimodal checkpoints: the text model under `language_model.` plus `vision_tower.*`, `mm_projector.*`.

The text part is written and read by `save_model` / `load_model`; the vision tower and projector (their module
names are the released names, see k2lab/model/vision.py) go to one more shard listed in the same index, so
transformers, vLLM and `load_model` (which skips them) all open the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from k2lab.checkpoint.hf import INDEX, CheckpointError, _atomic_write, _open, _read_weight_map, load_model, save_model
from k2lab.model.multimodal import K2VLForConditionalGeneration

VISION_SHARD = "model-vision.safetensors"
VISION_PREFIXES = ("vision_tower.", "mm_projector.")


def vision_state_dict_to_hf(model: K2VLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The vision tower and projector under their released checkpoint names."""
    return {f"{prefix}{name}": t for prefix in VISION_PREFIXES
            for name, t in getattr(model, prefix[:-1]).state_dict().items()}


def load_vision_from_hf(model: K2VLForConditionalGeneration, tensors: dict[str, torch.Tensor]) -> None:
    """Place released-name tensors into the vision tower and projector; every name and shape must match."""
    for prefix in VISION_PREFIXES:
        module: nn.Module = getattr(model, prefix[:-1])
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing, unexpected = sorted(set(expected) - set(part)), sorted(set(part) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{prefix}* tensors do not match the vision config: missing "
                                  f"{[prefix + k for k in missing[:3]]}, "
                                  f"unexpected {[prefix + k for k in unexpected[:3]]}")
        for k, v in part.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{prefix}{k} has shape {tuple(v.shape)}, the vision config implies "
                                      f"{tuple(expected[k].shape)}")
        module.load_state_dict(part, assign=True)


def save_multimodal(model: K2VLForConditionalGeneration, path: str | Path, max_shard_size: int | str = "2GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Text shards and config.json via save_model, then the vision shard, then the index again (last)."""
    path = save_model(model.language_model, path, max_shard_size, dtype)
    tensors = {n: t.detach().to(dtype or t.dtype).cpu().contiguous() for n, t in vision_state_dict_to_hf(model).items()}
    _atomic_write(path / VISION_SHARD, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    index = json.loads((path / INDEX).read_text())
    index["weight_map"].update({n: VISION_SHARD for n in tensors})
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    text = json.dumps(index, indent=2)
    _atomic_write(path / INDEX, lambda p: p.write_text(text))
    return path


def load_multimodal(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> K2VLForConditionalGeneration:
    """Load a kimi_k25 checkpoint directory (text via load_model, vision tensors by name)."""
    path = Path(path)
    language_model = load_model(path, device=device, dtype=dtype)
    config = language_model.config
    if config.wrapper is None or "vision_config" not in config.wrapper:
        raise CheckpointError(f"{path}/config.json has no vision_config: not a multimodal (kimi_k25) checkpoint")
    with torch.device("meta"):
        model = K2VLForConditionalGeneration(config)
    model.language_model = language_model
    weight_map = _read_weight_map(path)
    tensors = {}
    for fname in sorted({f for n, f in weight_map.items() if n.startswith(VISION_PREFIXES)}):
        with _open(path / fname) as f:
            for name in f.keys():
                if name.startswith(VISION_PREFIXES):
                    t = f.get_tensor(name)
                    tensors[name] = t.to(device=device, dtype=dtype or t.dtype)
    load_vision_from_hf(model, tensors)
    return model.eval()
