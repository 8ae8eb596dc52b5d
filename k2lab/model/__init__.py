"""The K2 network: YaRN RoPE, MLA, MoE, blocks and the causal LM (and MoonViT in vision.py)."""

from k2lab.model.mla import MLA, CacheBatch, LatentCache
from k2lab.model.moe import MLP, Experts, MoE, Router
from k2lab.model.norm import RMSNorm
from k2lab.model.sampling import sample
from k2lab.model.transformer import Block, K2ForCausalLM, K2Model, parameter_counts

__all__ = ["MLA", "CacheBatch", "LatentCache", "MLP", "Experts", "MoE", "Router", "RMSNorm", "Block",
           "K2ForCausalLM", "K2Model", "parameter_counts", "sample"]
