"""Hugging Face checkpoints of k2lab models: the exact tensor names of the released weights, saving, loading.

Loading is lazy: the model is built on the meta device and each tensor is materialized straight onto the device
of the layer that owns it. Every name is checked against the model (nothing missing, nothing unexpected) before
anything is read, and every tensor (shape, dtype) before it is placed, so a bad checkpoint fails naming the key or
file, never with a silent partial load. Modules with their own stored form go through their codec (codecs.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from k2lab.checkpoint.codecs import LoadRequest, codec_for_config, codec_for_model
from k2lab.checkpoint.files import CheckpointError, ShardWriter, read_config, read_index
from k2lab.checkpoint.placement import FP32, check_names, check_tensor, place, resolve_device, targets
from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM

# The vision tower and projector of a K2.5/K2.6 checkpoint: not part of the text model.
VISION_PREFIXES = ("vision_tower.", "mm_projector.")


def prefix_of(model: nn.Module) -> str:
    """Name prefix of the model's tensors: a text model inside a kimi_k25 wrapper sits under `language_model.`."""
    return "language_model." if isinstance(model, K2ForCausalLM) and model.config.wrapper is not None else ""


def _language_model(model: nn.Module) -> tuple[K2ForCausalLM, str]:
    """The K2ForCausalLM in `model` and its module name prefix."""
    return (model, "") if isinstance(model, K2ForCausalLM) else (model.language_model, "language_model.")


def _stored(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, encoded) as stored: released names, codec-owned modules in their stored form."""
    prefix, codec = prefix_of(model), codec_for_model(model)
    owned = {n: m for n, m in model.named_modules() if codec is not None and isinstance(m, codec.module_type)}
    skip = tuple(f"{prefix}{n}." for n in owned)
    lm, lm_name = _language_model(model)
    if lm.config.tie_word_embeddings and lm.lm_head.weight is lm.model.embed_tokens.weight:  # stored once, as
        # transformers does (and ties on load); a head tied without the flag is stored under both names
        skip = (*skip, f"{prefix}{lm_name}lm_head.weight")
    for name, slot in targets(model, prefix).items():
        if not name.startswith(skip):
            t = getattr(slot.module, slot.attr)
            yield name, (t[slot.expert] if slot.expert is not None else t), False
    for module_name, module in owned.items():
        for local, t in codec.encode(module):
            yield f"{prefix}{module_name}.{local}", t, True


def state_dict_to_hf(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) in the released layout; expert rows are views of the stacked tensor."""
    for name, t, _ in _stored(model):
        yield name, t


def generation_config(config: ModelConfig) -> dict:
    """Stop at [EOS] and at <|im_end|> (the end of a chat turn, vocab_size - 254 in the K2 special-token layout),
    so transformers' and vLLM's generate end assistant turns."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": [config.eos_token_id, config.vocab_size - 254],
            "pad_token_id": config.pad_token_id}


def save_model(model: nn.Module, path: str | Path, max_shard_size: int | str = "2GB",
               dtype: torch.dtype | None = None) -> Path:
    """Write config.json, generation_config.json, model-XXXXX-of-YYYYY.safetensors and the index (last), each
    atomically. `dtype` casts full-precision tensors; the router stays float32, codec tensors stay as encoded."""
    writer = ShardWriter(path, max_shard_size)
    for name, t, encoded in _stored(model):
        if name.endswith(FP32):
            t = t.to(torch.float32)
        elif not encoded and dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        writer.add(name, t)
    config = model.config.to_dict()
    codec = codec_for_model(model)
    if codec is not None:
        config["quantization_config"] = codec.quantization_config()
    return writer.finish({"config.json": config, "generation_config.json": generation_config(model.config)})


def _is_mtp(name: str, config: ModelConfig) -> bool:
    """Multi-token-prediction layers (beyond num_hidden_layers) are not part of the causal LM."""
    m = re.match(r"^(?:language_model\.)?model\.layers\.(\d+)\.", name)
    return bool(m) and int(m[1]) >= config.num_hidden_layers


def load_weights(model: nn.Module, raw_config: dict, request: LoadRequest, ignore: tuple[str, ...] = ()) -> nn.Module:
    """Fill a meta-device k2lab model from the checkpoint at request.path; names starting with `ignore` are skipped.

    The head is tied to the embeddings, as transformers does, when the config ties them and no lm_head is stored.
    """
    path, config = request.path, model.config
    index = read_index(path)
    stored = {n for n in index.files if not n.startswith(ignore) and not _is_mtp(n, config)}
    qc = raw_config.get("quantization_config")
    codec = codec_for_config(qc, path) if qc else None
    claimed, decode = codec.claim(model, qc, stored, request) if codec else (set(), None)
    slots = targets(model, request.prefix)
    lm, lm_name = _language_model(model)
    head = f"{request.prefix}{lm_name}lm_head.weight"
    tie = config.tie_word_embeddings and head not in stored
    if tie:
        del slots[head]
    check_names(slots, stored - claimed, path, "config/weights mismatch?")
    encoded: dict[str, torch.Tensor] = {}
    for name, t in index.read(sorted(stored)):
        if name in claimed:
            encoded[name] = t
            continue
        slot = slots[name]
        check_tensor(name, t, slot)
        dtype = torch.float32 if name.endswith(FP32) else (request.dtype or t.dtype)
        place(slot, t.to(device=resolve_device(slot.module_name, request.device, request.device_map), dtype=dtype))
    if decode is not None:
        decode(encoded)
    if tie:
        lm.tie_weights()
    lm.model.rotary_emb.reset(resolve_device(f"{lm_name}model.layers.0", request.device, request.device_map))
    return model.eval()


def load_text_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    device_map: dict[str, str] | None = None) -> K2ForCausalLM:
    """The language model of a checkpoint (a K2.5/K2.6 checkpoint's vision tensors are left unread)."""
    path = Path(path)
    raw, config = read_config(path)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    return load_weights(model, raw, LoadRequest(path, prefix_of(model), device, dtype, device_map), VISION_PREFIXES)

