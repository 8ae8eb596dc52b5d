"""Checkpoint files: config.json, the safetensors index, lazy shard reads, and the shard writer.

Reading is lazy: shards are memory-mapped and tensors come out one at a time, so no full copy of a checkpoint is
held. Writing puts every file in place atomically (k2lab.runs.atomic_path) with the index last, so a reader never
sees an index pointing at half-written shards.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from k2lab.config import ModelConfig
from k2lab.runs import atomic_path, write_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# transformers' save_pretrained (5.x) writes a kimi_k25 model under its load-time renames run backwards, and some
# of them do not invert (its vision `blocks -> layers` rename also turns the text layers into `blocks`). transformers
# reads both spellings; these map the saved spelling back to the released names.
_TRANSFORMERS_SAVED = [(re.compile(r"^language_model\.model\.blocks\."), "language_model.model.layers."),
                       (re.compile(r"^model\.mm_projector\."), "mm_projector."),
                       (re.compile(r"^vision_tower\.encoder\.patch_embed\."), "vision_tower.patch_embed.")]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the key or file at fault."""


def read_config(path: Path) -> tuple[dict, ModelConfig]:
    """config.json as stored (codecs read its quantization_config) and as a ModelConfig."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory")
    try:
        raw = json.loads(file.read_text())
        return raw, ModelConfig.from_dict(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def released_name(key: str) -> str:
    for pattern, replacement in _TRANSFORMERS_SAVED:
        key = pattern.sub(replacement, key)
    return key


def open_shard(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file.name}: {e} (truncated or not a safetensors file?)") from None


@dataclass
class Index:
    """The tensors of a checkpoint directory by released name: which shard holds each, under which key."""

    path: Path
    files: dict[str, str]  # released name -> shard file name
    keys: dict[str, str]  # released name -> key inside the shard

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names`, shard by shard; a tensor missing from its shard or unreadable is named."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        for fname in sorted(by_file):
            with open_shard(self.path / fname) as f:
                present = set(f.keys())
                for name in by_file[fname]:
                    key = self.keys[name]
                    if key not in present:
                        raise CheckpointError(f"{fname} does not contain {key}, though {INDEX} says it does")
                    try:
                        yield name, f.get_tensor(key)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"cannot read {key} from {fname}: {e}") from None


def read_index(path: Path) -> Index:
    """The index of `path` (model.safetensors.index.json, or the keys of a single model.safetensors)."""
    index_file = path / INDEX
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file} is not a valid safetensors index: {e}") from None
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).is_file():
                raise CheckpointError(f"{index_file} points to {fname}, which does not exist in {path}")
    elif (path / SINGLE).is_file():
        with open_shard(path / SINGLE) as f:
            weight_map = {k: SINGLE for k in f.keys()}
    else:
        raise CheckpointError(f"{path} has neither {INDEX} nor {SINGLE}")
    keys = {released_name(k): k for k in weight_map}
    return Index(path, {name: weight_map[key] for name, key in keys.items()}, keys)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '2GB' or '500MB'")
    unit = (m[2] or "B").upper().replace("I", "")
    return int(float(m[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


class ShardWriter:
    """Collects (name, tensor) in order, then writes model-XXXXX-of-YYYYY.safetensors of at most
    `max_shard_size` bytes each, the JSON files, and the index last; shards of an earlier save are removed."""

    def __init__(self, path: str | Path, max_shard_size: int | str = "2GB"):
        self.path, self.limit = Path(path), parse_size(max_shard_size)
        self.shards: list[dict[str, torch.Tensor]] = [{}]
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").clone().contiguous()  # clone: expert rows are views of one stacked tensor
        nbytes = t.numel() * t.element_size()
        if self.shards[-1] and self.size + nbytes > self.limit:
            self.shards.append({})
            self.size = 0
        self.shards[-1][name] = t
        self.size += nbytes

    def finish(self, json_files: dict[str, dict]) -> Path:
        """Write the shards, then `json_files` (file name -> content, e.g. config.json), then the index."""
        self.path.mkdir(parents=True, exist_ok=True)
        weight_map, total = {}, 0
        for i, tensors in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            with atomic_path(self.path / fname) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
            for n, t in tensors.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        for fname, content in json_files.items():
            write_json(self.path / fname, content)
        write_json(self.path / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        for stale in self.path.glob("model*.safetensors"):  # an earlier save with another shard count
            if stale.name not in set(weight_map.values()):
                stale.unlink()
        return self.path
