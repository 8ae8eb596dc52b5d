"""ModelConfig: the one dataclass of hyper-parameters for the K2 family, its presets, and config.json I/O.

Field names are the Hugging Face / DeepSeek-V3 ones, so a released `config.json` maps onto it key for key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale for a context extended `factor` times: 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class ConfigError(ValueError):
    """A preset name or config.json that k2lab cannot use; the message names it."""


@dataclass
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536  # None: a plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    rope_theta: float = 50000.0
    # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    # "mscale", "mscale_all_dim"}; None for plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    pad_token_id: int = 163839
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.02
    # The K2.5/K2.6 multimodal wrapper around the text config (model_type kimi_k25), kept verbatim for round trips.
    wrapper: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if self.n_routed_experts % self.n_group:
            problems.append(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            problems.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            problems.append("num_experts_per_tok exceeds the experts left after group-limited masking")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.first_k_dense_replace > self.num_hidden_layers:
            problems.append("first_k_dense_replace exceeds num_hidden_layers")
        if self.rope_scaling is not None and self.rope_scaling.get("type", "yarn") != "yarn":
            problems.append(f"only YaRN rope scaling is supported, got {self.rope_scaling!r}")
        if problems:
            raise ConfigError("invalid ModelConfig: " + "; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale^2 under YaRN (REFERENCE §3)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Absorbed-decode cache: the normalized latent and the rotated rope key, per token, all layers."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_value

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    # ---- config.json ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read a DeepSeek-V3 / Kimi-K2 text config, or a K2.5/K2.6 `kimi_k25` wrapper with a `text_config`."""
        wrapper = None
        if d.get("model_type") == "kimi_k25" or "text_config" in d:
            if "text_config" not in d:
                raise ConfigError("kimi_k25 config.json has no text_config")
            wrapper = {k: v for k, v in d.items() if k not in ("text_config", "model_type")}
            d = d["text_config"]
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        # Keys transformers reads that change the computation in ways k2lab does not model: refuse, never ignore.
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r}: the K2 family computes with 'silu' only")
        if d.get("rope_interleave", True) is False:
            raise ValueError("rope_interleave false: k2lab reads the released (interleaved) RoPE layout only")
        rope = d.pop("rope_parameters", None)  # transformers 5 form: rope_theta and the scaling in one dict
        if rope is not None:
            rope = dict(rope)
            if "rope_theta" in rope:
                kw["rope_theta"] = rope.pop("rope_theta")
            kind = rope.pop("rope_type", rope.pop("type", "default"))
            if kind not in ("default", None):
                kw["rope_scaling"] = {"type": kind, **rope}
        scaling = d.pop("rope_scaling", None)
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.pop("rope_type", scaling.pop("type", "yarn"))
            kw["rope_scaling"] = {"type": kind, **scaling}
        # Keys outside the dataclass (hidden_act, topk_method, ...) are fixed for this family and not modelled.
        kw.update({k: v for k, v in d.items() if k in names and k != "wrapper"})
        if wrapper is not None:  # transformers ties the head by the wrapper's flag (default true), not text_config's
            kw["tie_word_embeddings"] = wrapper.get("tie_word_embeddings", True)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("rope_scaling"):
            kw["rope_scaling"] = {k: v for k, v in kw["rope_scaling"].items() if v is not None}
        return cls(**kw, wrapper=wrapper)

    def to_dict(self) -> dict[str, Any]:
        """The config.json of a k2lab checkpoint: a `deepseek_v3` text config (or the kimi_k25 wrapper)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "wrapper"}
        rope_scaling = d.pop("rope_scaling")
        text = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **d,
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "rope_interleave": True,
            "rope_scaling": None,
            "torch_dtype": "bfloat16",
        }
        if rope_scaling:
            scaling = {k: v for k, v in rope_scaling.items() if k != "type"}
            text["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **scaling}
        if self.wrapper is None:
            return text
        text["model_type"] = "kimi_k2"
        text["architectures"] = ["DeepseekV3ForCausalLM"]
        return {**self.wrapper, "model_type": "kimi_k25", "text_config": text}

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {file}; is {path} a checkpoint directory?") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON ({e}); is {path} a checkpoint directory?") from None

    def as_wrapper(self, vision_config: dict | None = None) -> "ModelConfig":
        """The same text model inside a K2.5/K2.6 `kimi_k25` multimodal wrapper config."""
        wrapper = {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "media_placeholder_token_id": 163605,
            "tie_word_embeddings": False,
            "vision_config": vision_config if vision_config is not None else {},
        }
        return dataclasses.replace(self, wrapper=wrapper)


_K2 = dict(
    rms_norm_eps=1e-6,
    max_position_embeddings=131072,
    rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)
_K25 = dict(
    rms_norm_eps=1e-5,
    max_position_embeddings=262144,
    rope_scaling=dict(type="yarn", factor=64.0, original_max_position_embeddings=4096, beta_fast=32.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)
# The small presets keep the family's shape: MLA with both LoRA ranks, one dense layer, MoE with a shared
# expert, sigmoid noaux_tc routing, YaRN scaled down (factor 4 over 1024 original positions).
_SMALL_ROPE = dict(type="yarn", factor=4.0, original_max_position_embeddings=1024, beta_fast=32.0, beta_slow=1.0,
                   mscale=1.0, mscale_all_dim=1.0)
PRESETS: dict[str, dict[str, Any]] = {
    "kimi-k2": _K2,
    "kimi-k2.5": _K25,
    "kimi-k2.6": _K25,
    "tiny": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
        rope_theta=10000.0, rope_scaling=_SMALL_ROPE, bos_token_id=8192 - 256, eos_token_id=8192 - 255,
        pad_token_id=8191,
    ),
    "small": dict(
        vocab_size=32768, hidden_size=768, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=12,
        num_attention_heads=12, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, max_position_embeddings=8192,
        rope_theta=10000.0, rope_scaling=_SMALL_ROPE, bos_token_id=32768 - 256, eos_token_id=32768 - 255,
        pad_token_id=32767,
    ),
}
