"""Checkpoints in the Hugging Face layout of the released K2 / K2.5 / K2.6 weights.

Public API: `load_model` / `save_model` (what a checkpoint holds: text or multimodal model, full precision or with
codec-stored modules such as INT4 experts), and the pieces they are built from: `read_index` / `Index` (which shard
holds which tensor), `ShardWriter` (sharded, atomic writes, index last), `targets` / `place` / `check_names`
(tensor placement and name checks), `register_codec` (a module kind with its own stored form).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from k2lab.checkpoint.codecs import Codec, LoadRequest, register_codec
from k2lab.checkpoint.files import CheckpointError, Index, ShardWriter, read_config, read_index
from k2lab.checkpoint.hf import VISION_PREFIXES, load_text_model, load_weights, save_model, state_dict_to_hf
from k2lab.checkpoint.multimodal import load_multimodal
from k2lab.checkpoint.placement import Slot, check_names, place, targets
from k2lab.model.multimodal import has_vision

__all__ = ["CheckpointError", "Codec", "Index", "LoadRequest", "ShardWriter", "Slot", "VISION_PREFIXES",
           "check_names", "load_model", "load_multimodal", "load_text_model", "load_weights", "place",
           "read_config", "read_index", "register_codec", "save_model", "state_dict_to_hf", "targets"]


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               device_map: dict[str, str] | None = None, text_only: bool = False) -> nn.Module:
    """What the checkpoint holds: K2VLForConditionalGeneration when config.json has a vision_config (unless
    `text_only`), else K2ForCausalLM; codec-stored modules (INT4 experts) stay in their stored form.

    dtype None keeps each tensor's stored dtype; the router stays float32. device_map maps module-name prefixes
    (e.g. "model.layers.30") to devices, so layers can be placed across GPUs; others go to `device`.
    """
    path = Path(path)
    _, config = read_config(path)
    if has_vision(config) and not text_only:
        return load_multimodal(path, device, dtype, device_map)
    return load_text_model(path, device, dtype, device_map)
