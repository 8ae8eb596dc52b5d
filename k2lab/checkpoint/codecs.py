"""Codec hook: a module kind with its own stored form (e.g. INT4 routed experts) registers how it is written and
read. The checkpoint code finds a codec by the `quant_method` of config.json's `quantization_config` when
loading, and by module type when saving; it never imports the packages that provide codecs (k2lab.quant
registers its codec when imported, and `k2lab.load_model` / `k2lab.save_model` import it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from k2lab.checkpoint.files import CheckpointError


@dataclass
class LoadRequest:
    """What a load asked for: the directory, the name prefix of the model's tensors, where and in what dtype."""

    path: Path
    prefix: str
    device: torch.device | str
    dtype: torch.dtype | None
    device_map: dict[str, str] | None


class Codec(Protocol):
    module_type: type[nn.Module]  # the modules this codec writes in its stored form

    def quantization_config(self) -> dict:
        """The config.json `quantization_config` announcing the stored form."""

    def encode(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The stored tensors of one module, names relative to the module (e.g. `3.down_proj.weight_packed`)."""

    def claim(self, model: nn.Module, quantization_config: dict, names: set[str], request: LoadRequest
              ) -> tuple[set[str], Callable[[dict[str, torch.Tensor]], None]]:
        """Check the config against the stored `names` and take the modules it decodes out of `model` (so they are
        not expected in full precision). Returns the names it decodes and `decode(tensors)`, which builds those
        modules from the read tensors (claimed name -> tensor) and puts them back; CheckpointError on any
        disagreement."""


_CODECS: dict[str, Codec] = {}


def register_codec(quant_method: str, codec: Codec) -> None:
    _CODECS[quant_method] = codec


def codec_for_config(quantization_config: dict, path: Path) -> Codec:
    method = quantization_config.get("quant_method")
    if method not in _CODECS:
        known = ", ".join(sorted(_CODECS)) or "none (import k2lab.quant, or load through k2lab.load_model)"
        raise CheckpointError(f"{path / 'config.json'}: no codec reads quantization_config quant_method "
                              f"{method!r}; registered: {known}")
    return _CODECS[method]


def codec_for_model(model: nn.Module) -> Codec | None:
    """The codec whose module type the model holds (at most one kind of stored form per checkpoint)."""
    types = {type(m) for m in model.modules()}
    found = [c for c in _CODECS.values() if c.module_type in types]
    if len(found) > 1:
        raise ValueError("the model holds modules of several codecs; one quantization_config cannot describe them")
    return found[0] if found else None
