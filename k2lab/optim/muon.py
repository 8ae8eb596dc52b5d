"""Muon in the Kimi K2 form, for 2-D weights and 3-D stacked expert weights, and the K2 parameter groups.

Why not `torch.optim.Muon` directly: it always runs Newton-Schulz in bf16 (fast on GPUs and on CPUs with bf16
units such as AMX, far slower than fp32 on CPUs without them) and rejects the 3-D expert tensors [E, out, in]. This class is the same update (tests/test_muon.py shows it
equals `torch.optim.Muon(adjust_lr_fn="match_rms_adamw")` when both run Newton-Schulz in bf16), with the
Newton-Schulz dtype chosen per device and one batched orthogonalization per expert matrix.

Update per matrix W [A, B] (REFERENCE §4): M = mu*M + G; O = NS5(G + mu*M) * 0.2*sqrt(max(A, B));
W = W - lr*(O + wd*W). Like torch, the momentum is kept as an EMA (M' = (1-mu)*M); Newton-Schulz normalizes
its input, so the update is the same.

Sharded weights (FSDP2 DTensors) are gathered whole before Newton-Schulz and the local rows of the result kept:
orthogonalizing a row shard alone would be a different (wrong) update. Expert-parallel weights hold whole
experts on each rank, so they are orthogonalized locally with no communication.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalize G [..., A, B] (each trailing matrix separately) with the quintic iteration."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation so X @ X^T is the small Gram matrix
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    if X.ndim == 2:
        for _ in range(steps):
            gram = X @ X.T
            X = torch.addmm(X, torch.addmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    else:
        X = X.reshape(-1, *X.shape[-2:])
        for _ in range(steps):
            gram = X @ X.mT
            X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
        X = X.reshape(*G.shape[:-2], *X.shape[-2:])
    return X.mT if tall else X


def _orthogonalize(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(update, DTensor):
        local = update.to_local()
        if update.ndim == 3 and update.placements == (Shard(0),) and \
                local.shape[0] * update.device_mesh.size() == update.shape[0]:
            # Sharded by the expert axis: this rank holds whole experts, orthogonalize them where they are.
            o = zeropower_via_newtonschulz(local, steps, dtype=dtype).to(update.dtype)
            return DTensor.from_local(o, update.device_mesh, update.placements, run_check=False)
        # A row shard of a matrix: orthogonalize the whole matrix, keep this rank's rows.
        full = zeropower_via_newtonschulz(update.full_tensor(), steps, dtype=dtype).to(update.dtype)
        return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
    return zeropower_via_newtonschulz(update, steps, dtype=dtype)


class Muon(torch.optim.Optimizer):
    """K2 Muon for 2-D weights [A, B] and 3-D expert stacks [E, A, B]; lr and weight decay carry over from AdamW.

    `ns_dtype`: the Newton-Schulz dtype; None picks fp32 on CPU (exact, and fast on any CPU) and bf16 on
    accelerators (as torch.optim.Muon does everywhere). On CPUs with AMX, bf16 is 3-5x faster (README).
    """

    def __init__(self, params, lr: float = 2e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype | None = None) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid Muon settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D weights or 3-D expert stacks, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)
            for p, update in zip(params, self._orthogonalize_all(params, updates, group)):
                p.mul_(1 - lr * wd)  # decoupled weight decay with the unscaled lr, as in K2 and torch
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape[-2:])))
        return loss

    @staticmethod
    def _orthogonalize_all(params: list, updates: list, group: dict) -> list:
        """Newton-Schulz for every update of a group, same-shape matrices batched into one bmm chain.

        A tiny model has ~10 weight shapes over ~40 tensors: one batched iteration per shape instead of one per
        tensor cuts the step's op count without changing any matrix's result (each matrix is normalized and
        iterated on its own; max difference 0.0). Measured on tiny's Newton-Schulz (2-core AVX-512 CPU): 0.96x
        the per-tensor loop at 2 threads on a quiet machine, 0.79x at 1 thread (CPU bmm is less efficient than
        mm), 5x when the cores are oversubscribed (per-op synchronization dominates). On accelerators, where
        launches cost most, batching is the standard choice.
        """
        out: list = [None] * len(updates)
        buckets: dict[tuple, list[int]] = {}
        for i, (p, u) in enumerate(zip(params, updates)):
            dtype = group["ns_dtype"] or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
            if isinstance(u, DTensor):
                out[i] = _orthogonalize(u, group["ns_steps"], dtype)
            else:
                buckets.setdefault((tuple(u.shape[-2:]), u.dtype, u.device, dtype), []).append(i)
        for (shape, _, _, dtype), idx in buckets.items():
            stack = torch.cat([updates[i].reshape(-1, *shape) for i in idx]) if len(idx) > 1 \
                else updates[idx[0]].reshape(-1, *shape)
            o = zeropower_via_newtonschulz(stack, group["ns_steps"], dtype=dtype).to(stack.dtype)
            for i, chunk in zip(idx, o.split([updates[i].numel() // (shape[0] * shape[1]) for i in idx])):
                out[i] = chunk.reshape(updates[i].shape)
        return out


class CombinedOptimizer:
    """Several torch optimizers stepped as one (Muon for hidden matrices, AdamW for the rest).

    `param_groups` lists every group so a schedule can set each group's lr; every group keeps its
    `base_lr`, the peak the schedule multiplies.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o.param_groups]

    @property
    def param_groups(self) -> list[dict]:  # read each time: load_state_dict replaces the group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {type(o).__name__: o.state_dict() for o in self.optimizers}

    def load_state_dict(self, state: dict) -> None:
        names = [type(o).__name__ for o in self.optimizers]
        if sorted(state) != sorted(names):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run uses {sorted(names)}")
        for o in self.optimizers:
            o.load_state_dict(state[type(o).__name__])


def _is_adamw_param(name: str, p: nn.Parameter) -> bool:
    """Embeddings, lm_head, norms, the router and anything not a matrix go to AdamW (REFERENCE §4)."""
    return p.ndim < 2 or "embed_tokens" in name or "lm_head" in name or name.endswith("mlp.gate.weight")


def build_optimizer(model: nn.Module, kind: str = "muonclip", lr: float = 2e-4,
                    weight_decay: float = 0.1) -> CombinedOptimizer:
    """The K2 parameter groups: Muon on hidden 2-D weights and 3-D expert stacks, AdamW (0.9, 0.95) on the rest.

    kind "muonclip" and "muon" build the same optimizer (QK-Clip runs after the step, see qk_clip.py);
    "adamw" puts every parameter on AdamW. Vectors (norms) get no weight decay.
    """
    if kind not in ("muonclip", "muon", "adamw"):
        raise ValueError(f"unknown optimizer {kind!r}; choose muonclip, muon or adamw")
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            no_decay.append(p)
        elif kind == "adamw" or _is_adamw_param(name, p):
            decay.append(p)
        else:
            muon.append(p)
    adamw_groups = [g for g in (dict(params=decay, weight_decay=weight_decay),
                                dict(params=no_decay, weight_decay=0.0)) if g["params"]]
    optimizers = [torch.optim.AdamW(adamw_groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)]
    if muon:
        optimizers.insert(0, Muon(muon, lr=lr, weight_decay=weight_decay))
    opt = CombinedOptimizer(*optimizers)
    for g in opt.param_groups:
        g["base_lr"] = lr
    return opt
