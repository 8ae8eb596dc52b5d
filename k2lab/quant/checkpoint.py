"""INT4 models in checkpoints: PTQ, and the compressed-tensors `pack-quantized` codec for the routed experts.

`PackQuantizedExperts` is registered with k2lab.checkpoint when k2lab.quant is imported: saving writes each
`Int4Experts` as per-expert `weight_packed` / `weight_scale` / `weight_shape` plus config.json's
`quantization_config`; loading checks them against that config (group size, shapes, the ignore list) and builds
`Int4Experts` without ever expanding the experts to full precision. Everything else goes through the generic code.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from k2lab.checkpoint import CheckpointError, LoadRequest, read_config, register_codec
from k2lab.model import Experts, K2ForCausalLM, MoE
from k2lab.quant import format as ct
from k2lab.quant.experts import PROJS, Int4Experts

_QUANT_TENSOR = re.compile(r"^(.*)\.(weight_packed|weight_scale|weight_shape)$")
_EXPERT_LINEAR = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_LINEAR = re.compile(r"^(.*_proj|lm_head)\.weight$")  # the nn.Linear weights of the HF DeepseekV3 modules


def quantize_experts_(model: nn.Module) -> nn.Module:
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
    return "quantization_config" in read_config(Path(path))[0]


class PackQuantizedExperts:
    """Routed experts stored as compressed-tensors pack-quantized Linears (K2-Thinking / K2.5 / K2.6 releases)."""

    module_type = Int4Experts

    def quantization_config(self) -> dict:
        return ct.quantization_config()

    def encode(self, module: Int4Experts) -> Iterator[tuple[str, torch.Tensor]]:
        for p, (packed, scale) in module.compressed().items():
            n, k = module.shapes[p]
            for e in range(module.n_experts):
                yield f"{e}.{p}.weight_packed", packed[e]
                yield f"{e}.{p}.weight_scale", scale[e]
                yield f"{e}.{p}.weight_shape", torch.tensor([n, k], dtype=torch.int64)

    def claim(self, model: nn.Module, quantization_config: dict, names: set[str], request: LoadRequest
              ) -> tuple[set[str], Callable[[dict[str, torch.Tensor]], None]]:
        path, prefix = request.path, request.prefix
        if torch.device(request.device).type != "cpu" or request.device_map:
            raise CheckpointError(f"INT4 experts compute with torch's CPU int4 kernel; load {path} on device 'cpu'")
        try:
            group_size = ct.read_quantization_config(quantization_config)
        except ValueError as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from None
        lm_prefix = prefix + ("" if isinstance(model, K2ForCausalLM) else "language_model.")
        packed = {n for n in names if _QUANT_TENSOR.match(n)}
        # module names as the ignore list sees them: relative to the text model (a wrapper's list may add its prefix)
        quantized = {_QUANT_TENSOR.match(n)[1].removeprefix(lm_prefix) for n in packed}
        plain = [n.removeprefix(lm_prefix) for n in sorted(names - packed) if n.startswith(lm_prefix)]
        _check_ignore_list(plain, quantized, quantization_config.get("ignore") or [], lm_prefix)
        stray = sorted(q for q in quantized if not _EXPERT_LINEAR.match(q))
        if stray:
            raise CheckpointError(f"pack-quantized tensors outside the routed experts (k2lab quantizes experts "
                                  f"only), e.g. {stray[:3]}")
        moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
        for m in moes.values():  # built from their packed tensors by `decode`
            m.experts = nn.Module()

        def decode(tensors: dict[str, torch.Tensor]) -> None:
            linears: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # Linear name -> local tensors
            for name in list(tensors):
                m = _QUANT_TENSOR.match(name)
                linears[m[1].removeprefix(prefix)][m[2]] = tensors.pop(name)
            config = model.config
            room = {f"{n}.experts.{e}.{p}" for n in moes for e in range(config.n_routed_experts) for p in PROJS}
            extra = sorted(set(linears) - room)
            if extra:
                raise CheckpointError(f"{len(extra)} pack-quantized Linears the config has no room for "
                                      f"(n_routed_experts {config.n_routed_experts}, MoE layers), e.g. {extra[:3]}")
            for name, moe in moes.items():  # layer by layer, releasing the read tensors as each becomes Int4Experts
                moe.experts = _build_experts(name, linears, config, group_size)

        return packed, decode


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


def _build_experts(moe_name: str, tensors: dict[str, dict[str, torch.Tensor]], config, group_size: int
                   ) -> Int4Experts:
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


register_codec("compressed-tensors", PackQuantizedExperts())
