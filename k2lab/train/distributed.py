"""torch.distributed for training (pre-training, SFT, RL): process group from torchrun's environment (gloo on
CPU, NCCL on CUDA, no code change between them), expert parallelism for the routed experts and FSDP2 for
everything else, and the torchrun entry point of each training command (`run_main`).

Placement. The routed-expert stacks gate/up/down_proj [E, out, in] are split on the expert axis: rank r of W
stores, computes and optimizes whole experts r*E/W .. (r+1)*E/W - 1, and tokens travel to them by all_to_all
(k2lab/train/expert_parallel.py). All other parameters are sharded by rows with `fully_shard` (one unit per
Block plus the root) and all-gathered for use. Router biases are buffers, replicated; their updates use loads
summed over ranks, so they stay identical everywhere.

Muon on shards (k2lab/optim/muon.py): a row-sharded matrix is gathered whole (DTensor.full_tensor),
orthogonalized, and each rank keeps its rows; an expert stack holds whole expert matrices on each rank, so each
rank orthogonalizes its own experts with no communication. QK-Clip scales rows of the sharded q_b/kv_b weights
in place with the same per-row factors on every rank (max logits are max-reduced over ranks first).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size(), device) if is_distributed() else (0, 1, device)


def teardown() -> None:
    """Leave the process group once every rank is done: gloo aborts a process (SIGABRT, "terminate called without
    an active exception") when one rank tears down while another is still inside a collective with it."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(model: nn.Module, world: int) -> nn.Module:
    """Expert parallel for the routed experts, FSDP2 for the rest: one unit per Block plus the root."""
    if world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from k2lab.train.expert_parallel import expert_parallel_

    mesh = init_device_mesh(next(model.parameters()).device.type, (world,))
    experts = expert_parallel_(model, mesh)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=experts)
    fully_shard(model, mesh=mesh, ignored_params=experts)
    register_fsdp_forward_method(model, "loss")  # the training loss runs the head through model.loss, not forward
    return model


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks (a new tensor; x itself when not distributed)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().clone().float()
    if is_distributed():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def gather_for_save(model: nn.Module, opt, config):
    """(a plain model holding the full weights on rank 0, else None; the full optimizer state keyed by name).

    The optimizer state is keyed by parameter name, so a checkpoint resumes under any world size.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if hasattr(model, "reshard"):  # FSDP2 keeps the root unsharded after a forward without backward (eval)
        model.reshard()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_state = {type(o).__name__: get_optimizer_state_dict(model, o, options=options) for o in opt.optimizers}
    if not is_distributed():
        return model, optim_state
    state = get_model_state_dict(model, options=options)
    if rank() != 0:
        return None, optim_state
    from k2lab.model import K2ForCausalLM

    with torch.device("meta"):
        plain = K2ForCausalLM(config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()  # assign gave a tied head its own tensor: one matrix again, as it trained
    return plain, optim_state


def full_model(model: nn.Module, into: nn.Module | None = None) -> nn.Module:
    """The sharded model's full weights in a plain model on every rank (collective: every rank calls it); the
    model itself when not distributed. Generation needs it: FSDP and expert parallelism make every forward a
    collective, so ranks sampling different lengths could not run their own rollouts or evals on the sharded
    model. into: the plain model to load the weights into (kept between calls), else a new one."""
    if not is_distributed():
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if hasattr(model, "reshard"):
        model.reshard()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
    if into is None:  # built for real once (not on meta: its non-persistent buffers, e.g. RoPE's, are not in state)
        from k2lab.model import K2ForCausalLM

        with torch.device(next(iter(state.values())).device):
            into = K2ForCausalLM(model.config).train(model.training)
    with torch.no_grad():
        into.load_state_dict(state)
    return into


def on_rank0(fn):
    """fn(model) -> dict run on a plain model with the full weights, on rank 0 only (the others get {}): the
    loop's `evals` under torchrun. Every rank must call the wrapper (it gathers the weights)."""
    def wrapped(model):
        full = full_model(model)
        return fn(full) if rank() == 0 else {}
    return wrapped


def gather_objects(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items: trajectories, grades)."""
    if not is_distributed():
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def my_shares(n: int) -> range:
    """This rank's indices among n equal shares (n a multiple of the world size), in the loop's row order:
    rank r holds shares r*n/W .. (r+1)*n/W - 1, as `train` hands rank r its micro-batches."""
    world = dist.get_world_size() if is_distributed() else 1
    per = n // world
    return range(rank() * per, (rank() + 1) * per)


def run_main(settings_cls, run, prog: str, argv: list[str] | None = None) -> None:
    """The torchrun entry point of a training command: flags are the settings fields (--max-steps 10
    --run-dir DIR ...); prints the last step's metrics (JSON) on rank 0. A bad setting or input ends in one
    line naming it, exit code 1, as the CLI does."""
    import argparse
    import json
    import sys

    from k2lab.train.settings import settings_fields

    parser = argparse.ArgumentParser(prog=prog)
    for f, typ, _ in settings_fields(settings_cls):
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:  # --x / --no-x, defaulting as the settings do (store_true would turn a True default off)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        elif f.default_factory is list:
            parser.add_argument(flag, nargs="*", default=[], help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    args = parser.parse_args(argv)
    try:
        record = run(settings_cls(**vars(args)))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if rank() == 0:
        print(json.dumps(record))
    teardown()


def load_optimizer_state(model: nn.Module, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = sorted(type(o).__name__ for o in opt.optimizers)
    if sorted(state) != names:
        raise ValueError(f"checkpoint has optimizer state for {sorted(state)}, this run uses {names}")
    for o in opt.optimizers:
        set_optimizer_state_dict(model, o, optim_state_dict=state[type(o).__name__],
                                 options=StateDictOptions(full_state_dict=True))
