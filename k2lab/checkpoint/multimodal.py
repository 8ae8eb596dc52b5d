"""K2.5/K2.6 multimodal checkpoints: the text model under `language_model.` plus `vision_tower.*`, `mm_projector.*`.

The module names of K2VLForConditionalGeneration are the released names, so the whole model goes through the same
placement, name checks and codecs as a text model (INT4 experts included); `save_model` writes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from k2lab.checkpoint.codecs import LoadRequest
from k2lab.checkpoint.files import CheckpointError, read_config, read_index
from k2lab.checkpoint.hf import VISION_PREFIXES, load_weights
from k2lab.model.multimodal import K2VLForConditionalGeneration, has_vision


def load_multimodal(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    device_map: dict[str, str] | None = None) -> K2VLForConditionalGeneration:
    """The multimodal model of a kimi_k25 checkpoint; a checkpoint without vision_config is refused."""
    path = Path(path)
    raw, config = read_config(path)
    if not has_vision(config):
        raise CheckpointError(f"{path}/config.json has no vision_config: not a multimodal (kimi_k25) checkpoint")
    try:
        with torch.device("meta"):
            model = K2VLForConditionalGeneration(config)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    if not any(name.startswith(VISION_PREFIXES) for name in read_index(path).files):
        raise CheckpointError(f"{path}/config.json has a vision_config but the checkpoint holds no vision_tower / "
                              "mm_projector tensors; load its language model with text_only=True")
    return load_weights(model, raw, LoadRequest(path, "", device, dtype, device_map))
