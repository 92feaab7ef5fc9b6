"""Run a test body in N CPU processes over gloo (torch.distributed), and collect results.

``full_gradient(pm, optimizer, param)`` rebuilds a reduce-scattered (ZeRO-2) gradient.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, initialises the
default process group with gloo on a free localhost port, calls ``fn(rank, world_size, *args)``
in each, and returns the list of per-rank return values (which must be picklable). An
exception in any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def full_gradient(pm, optimizer, param):
    """``param``'s reduced gradient on this rank (its TP/EP shard's, whole over the data-parallel
    group): under ZeRO-2 (``pm.shard_gradients``) each rank's part put in place and summed over
    the parameter's group, a collective every rank of it must call in the same order; else
    ``param.grad``."""
    import torch
    import torch.distributed as dist

    sync = pm.gradients.sync
    if pm.gradients.shard_of is None or not sync or all(p is not param for p in sync.params):
        return param.grad
    group = pm.placements[param].grad_group
    ranges, target = optimizer.gradient_shard(param)
    full = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
    if target is not None and target.grad is not None:
        start, end = ranges[dist.get_rank(group)]
        full[start:end] = target.grad.reshape(-1)
    dist.all_reduce(full, group=group)
    return full.view_as(param)


def gathered_state(pm):
    """The full tensors of the shards (DTensor's all-gather of the sharded state dict)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in pm.sharded_state_dict().items()}
