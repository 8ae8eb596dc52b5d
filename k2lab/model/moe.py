"""Mixture of experts: the noaux_tc sigmoid router, routed experts stored as 3-D tensors, and a shared expert.

Tokens are sorted by expert and each active expert runs one matmul over its tokens, so cost follows the active
experts. (torch's grouped_mm was slower than this loop on CPU and its CPU backward failed; a fused grouped GEMM
for GPUs is left for when it can be tested on one.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2lab.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """noaux_tc: choose by sigmoid score + correction bias (group-limited), weight by the unbiased score."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, k], weights [N, k] fp32)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:  # keep the topk_group groups whose two best experts score highest
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * self.scaling


class Experts(nn.Module):
    """Routed experts: gate_proj/up_proj [E, I, D] and down_proj [E, D, I]; expert e is gate_proj[e], ..."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (gate, up, down) weights the forward uses; QAT overrides this to fake-quantize them."""
        return self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weight [N, k] -> sum_k weight * expert_idx(x): [N, D]."""
        # Dispatch and combine are permutations (index_select by `order`, then by its inverse) plus a sum over
        # the k choices: no scatter-add with repeated indices, whose CPU/GPU kernels add in a thread-dependent
        # order, so forward and backward are bitwise reproducible (bench/model.py measures the cost).
        n, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        xs = x.repeat_interleave(k, dim=0).index_select(0, order)  # row j: the token of sorted pair j
        y = self.grouped_ffn(xs, counts).index_select(0, order.argsort())  # back to (token, choice) order
        y = y * weight.flatten()[:, None].to(y.dtype)
        return y.view(n, k, -1).sum(1).to(x.dtype)

    def grouped_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, D] sorted by expert with counts [E] rows each -> the experts' outputs [M, D]."""
        gate, up, down = self.weights()
        # unbind/split once: indexing per expert would make backward zero-fill the whole tensor per expert
        gate, up, down = gate.unbind(0), up.unbind(0), down.unbind(0)
        sizes = counts.tolist()
        outs = [F.linear(F.silu(F.linear(xe, gate[e])) * F.linear(xe, up[e]), down[e])
                for e, xe in enumerate(xs.split(sizes)) if sizes[e]]  # one matmul per active expert
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.last_load: torch.Tensor | None = None  # tokens per expert in the last forward, for balancing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weight = self.gate(flat)
        self.last_load = torch.bincount(idx.flatten(), minlength=self.experts.n_experts)
        return self.experts(flat, idx, weight).view(shape) + self.shared_experts(x)
