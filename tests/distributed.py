"""Run a function on W real processes joined by a gloo process group, with timeouts everywhere.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, each of which calls
``fn(rank, world_size, *args)`` after ``init_process_group("gloo")`` and returns its result to the parent. A failure
on any rank raises in the parent with that rank's traceback; a hang is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, collective_timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        buffer = io.BytesIO()  # plain bytes: tensors in shared memory would die with this process
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300, collective_timeout: float = 120):
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]``, each computed in its own gloo rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, collective_timeout), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s "
                                   f"(ranks exited abnormally: {dead})") from None
            if not ok:
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]


def sharded_step(model, method, input_ids, position_ids, target_ids, rank, world_size):
    """One sequence-parallel forward+backward of a patched model, as a training loop runs it.

    Returns the loss, the gathered full-sequence logits and every parameter's gradient averaged over the ranks (as
    DDP, DeepSpeed and accelerate average them)."""
    import easy_context as ec

    local = ec.prepare_seq_parallel_inputs(method, input_ids, position_ids, target_ids, rank, world_size, "cpu")
    logits = model(local["local_input_ids"], position_ids=local["local_position_ids"]).logits
    loss = ec.seq_parallel_cross_entropy(logits, local["local_target_ids"])
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
        dist.all_reduce(g)
        grads[name] = g / world_size
    return loss.detach(), ec.gather_seq_parallel(logits.detach(), method), grads
