"""Muon on FSDP2-style shards (DTensor, Shard(0)) over 2 gloo processes equals Muon on the whole tensors:
row-sharded matrices are orthogonalized whole, expert stacks sharded on the expert axis per local expert."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from k2lab.optim.muon import Muon


def _leave() -> None:
    """Wait for the other rank, then end the worker without interpreter shutdown: the results are saved, and gloo's
    threads sometimes abort the process as they are destroyed ("terminate called without an active exception",
    seen in a full-suite run on a fresh clone even with the barrier distributed.teardown puts before destroy)."""
    dist.barrier()
    os._exit(0)


def _shapes():
    return [(8, 6), (6, 10), (4, 5, 7)]  # two matrices (rows split across ranks) and a 4-expert stack


def _data():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(*s, generator=g) for s in _shapes()]
    grads = [[torch.randn(*s, generator=g) for s in _shapes()] for _ in range(3)]
    return weights, grads


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    weights, grads = _data()
    params = [nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in weights]
    opt = Muon(params, lr=0.05, weight_decay=0.1)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    full = [p.full_tensor() for p in params]
    if rank == 0:
        torch.save(full, out)
    _leave()


def test_sharded_muon_equals_whole_muon(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "sharded.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    sharded = torch.load(out)

    weights, grads = _data()
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = Muon(params, lr=0.05, weight_decay=0.1)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(sharded, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    # Orthogonalizing each row shard alone would differ: check the test can tell.
    from k2lab.optim.muon import zeropower_via_newtonschulz
    g = grads[0][0]
    whole = zeropower_via_newtonschulz(g)
    per_shard = torch.cat([zeropower_via_newtonschulz(h) for h in g.chunk(2)])
    assert (whole - per_shard).abs().max() > 1e-2


def _ep_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    from k2lab.model.moe import MoE
    from k2lab.train.expert_parallel import expert_parallel_
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    moe = MoE(tiny_config())
    for p in moe.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(rank))  # each rank its own tokens
    expert_parallel_(moe, init_device_mesh("cpu", (2,)))
    y = moe(x)
    y.pow(2).mean().backward()
    torch.save({"y": y.detach(), "x": x, "grad": moe.experts.gate_proj.grad.full_tensor()}, f"{out}.{rank}")
    _leave()


def test_expert_parallel_matches_local_experts(tmp_path):
    """Tokens dispatched to the owning rank and back give the same outputs; expert gradients are the mean over
    ranks of each rank's local gradient (what FSDP gives every other parameter)."""
    from k2lab.model.moe import MoE
    from tests.conftest import tiny_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ep")
    mp.spawn(_ep_worker, args=(port, out), nprocs=2, join=True)
    torch.manual_seed(0)
    moe = MoE(tiny_config())
    for p in moe.parameters():
        nn.init.normal_(p, std=0.1)
    grads = []
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        moe.zero_grad()
        y = moe(got["x"])
        y.pow(2).mean().backward()
        torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-6)
        grads.append(moe.experts.gate_proj.grad.clone())
    torch.testing.assert_close(got["grad"], (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-7)
