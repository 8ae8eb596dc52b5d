"""Expert parallelism for the MoE layers: each rank holds E/W whole experts and tokens travel to them.

Routed-expert stacks become DTensors sharded on the expert axis (rank r owns experts r*E/W .. (r+1)*E/W - 1)
that FSDP leaves alone (ignored_params), so they are never all-gathered. A forward sends each (token, choice)
pair to the rank owning its expert with one all_to_all, runs the local experts on what arrives, and sends the
outputs back with a second all_to_all; both are differentiable, so each expert's gradient sums the
contributions of every rank's tokens. That sum is divided by W so it matches FSDP's mean over ranks.
Muon sees a Shard(0) DTensor per stack and orthogonalizes each local expert where it lives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertParallelExperts(nn.Module):
    """Drop-in for `Experts` (same parameter names and forward signature) with experts spread over ranks."""

    def __init__(self, experts: nn.Module, mesh) -> None:
        super().__init__()
        self.n_experts = experts.n_experts
        self.world = mesh.size()
        if self.n_experts % self.world:
            raise ValueError(f"{self.n_experts} experts cannot be split evenly over {self.world} ranks")
        self.local_experts = self.n_experts // self.world
        self.rank = dist.get_rank()
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            setattr(self, name, nn.Parameter(distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx/weight [N, k] -> [N, D]: the same sum of weighted expert outputs as `Experts`."""
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # sorted by expert, hence by owning rank
        token = order // idx.shape[1]
        send_counts = torch.bincount(flat[order] // self.local_experts, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        local_ids = torch.empty(sum(recv), dtype=flat.dtype, device=flat.device)
        dist.all_to_all_single(local_ids, (flat[order] % self.local_experts).contiguous(), recv, send)
        xs = dist_fn.all_to_all_single(x.new_empty(sum(recv), x.shape[1]), x[token].contiguous(), recv, send)
        ys = self._local_ffn(xs, local_ids)
        y = dist_fn.all_to_all_single(x.new_empty(len(order), x.shape[1]), ys, send, recv)
        y = y * weight.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _local_ffn(self, xs: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Rows xs [M, D] for this rank's experts (ids local_ids [M], from all ranks) -> outputs [M, D]."""
        gate, up, down = (_ScaleGrad.apply(p.to_local(), 1.0 / self.world)
                          for p in (self.gate_proj, self.up_proj, self.down_proj))
        order = local_ids.argsort(stable=True)
        counts = torch.bincount(local_ids, minlength=self.local_experts).tolist()
        out = torch.empty_like(xs)
        start = 0
        parts, rows = [], []
        for e, n in enumerate(counts):
            if n:
                sel = order[start:start + n]
                xe = xs[sel]
                parts.append(F.linear(F.silu(F.linear(xe, gate[e])) * F.linear(xe, up[e]), down[e]))
                rows.append(sel)
                start += n
        if not parts:  # keep the weights in the graph so every rank's backward matches its collectives
            return xs * 0 + 0 * (gate.sum() + up.sum() + down.sum())
        return out.index_copy(0, torch.cat(rows), torch.cat(parts))


def expert_parallel_(model: nn.Module, mesh) -> set[nn.Parameter]:
    """Replace every MoE's routed experts by ExpertParallelExperts; returns their parameters (for FSDP to ignore)."""
    owned: set[nn.Parameter] = set()
    for module in model.modules():
        if hasattr(module, "experts") and hasattr(module, "gate") and hasattr(module.experts, "n_experts"):
            module.experts = ExpertParallelExperts(module.experts, mesh)
            owned.update(module.experts.parameters())
    return owned
