"""Communication over a sequence-parallel process group: the ring exchange and small helpers.

Everything takes an explicit ``group`` (``None`` means the default group) and works on any torch.distributed backend:
gloo on CPU, NCCL on GPUs. Ranks inside the group are group-local; peers are translated to global ranks for P2P.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["RingComm", "group_rank", "group_size", "all_reduce_sum"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    """Size of ``group``; 1 when torch.distributed is not initialised."""
    return dist.get_world_size(group) if _active() else 1


def group_rank(group=None) -> int:
    """This process's rank inside ``group``; 0 when torch.distributed is not initialised."""
    return dist.get_rank(group) if _active() else 0


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over ``group`` (out of place, no autograd)."""
    if group_size(group) == 1:
        return x.clone()
    y = x.detach().clone().contiguous()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y


class RingComm:
    """Send tensors to the next rank of the ring and receive the previous rank's, asynchronously.

    ``start(tensors)`` posts one batched send/receive and returns the receive buffers at once, so the caller can
    compute on the current block while the next one is in flight; ``wait()`` completes the exchange. One exchange may
    be in flight per ``RingComm``; schedules that move two streams (K/V forward, dK/dV back) use two.
    """

    def __init__(self, group=None, tag: int = 0):
        self.group = group
        self.tag = tag
        self.rank = group_rank(group)
        self.world_size = group_size(group)
        if self.world_size > 1:
            to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
            self.send_to = to_global((self.rank + 1) % self.world_size)
            self.recv_from = to_global((self.rank - 1) % self.world_size)
        self._requests: Optional[List] = None

    def start(self, tensors: Sequence[torch.Tensor], recv_from: Optional[int] = None, send_to: Optional[int] = None):
        if self._requests is not None:
            raise RuntimeError("RingComm.start called while an exchange is in flight: call wait() first")
        send_to = self.send_to if send_to is None else send_to
        recv_from = self.recv_from if recv_from is None else recv_from
        buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, self.group, self.tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, recv_from, self.group, self.tag) for b in buffers]
        self._requests = dist.batch_isend_irecv(ops)
        self._ops = ops  # keeps the send tensors alive until wait()
        return buffers

    def wait(self) -> None:
        if self._requests is None:
            return
        for req in self._requests:
            req.wait()
        self._requests = self._ops = None
