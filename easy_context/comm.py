"""Communication over a sequence-parallel process group: point-to-point transfers, the ring exchange, small helpers.

Everything takes an explicit ``group`` (``None`` means the default group) and works on any torch.distributed backend:
gloo on CPU, NCCL on GPUs. Ranks inside the group are group-local; :class:`PeerExchange`, the one point-to-point
helper (the ring's :class:`RingComm` and dist_flash's schedule both use it), translates them to global ranks.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["PeerExchange", "RingComm", "group_rank", "group_size", "all_reduce_sum"]


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


class PeerExchange:
    """Point-to-point transfers over ``group``, posted together in one ``batch_isend_irecv``.

    Peers are group-local ranks; they are translated to global ranks for torch.distributed here, once for every
    schedule. Queue a batch with :meth:`send` and :meth:`recv` (in the same order on every rank, so that backends that
    match by order, NCCL, pair them as backends that match by tag, gloo, do), :meth:`start` it, compute, then
    :meth:`wait`. One batch may be in flight at a time.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = group_rank(group)
        self.world_size = group_size(group)
        self._ops: List = []
        self._requests: Optional[List] = None

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def send(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        """Queue sending ``tensor`` to group rank ``peer``; the tensor is kept alive until :meth:`wait`."""
        self._queue(dist.isend, tensor.contiguous(), peer, tag)

    def recv(self, like: torch.Tensor, peer: int, tag: int = 0) -> torch.Tensor:
        """Queue receiving a tensor shaped like ``like`` from group rank ``peer``; returns its buffer, filled after
        :meth:`wait`."""
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._queue(dist.irecv, buffer, peer, tag)
        return buffer

    def _queue(self, op, tensor: torch.Tensor, peer: int, tag: int) -> None:
        if self._requests is not None:
            raise RuntimeError("PeerExchange: a batch is in flight: call wait() before queueing the next one")
        self._ops.append(dist.P2POp(op, tensor, self.global_rank(peer), self.group, tag))

    def start(self) -> None:
        """Post the queued transfers (none: nothing to do)."""
        if self._requests is not None:
            raise RuntimeError("PeerExchange.start called while a batch is in flight: call wait() first")
        self._requests = dist.batch_isend_irecv(self._ops) if self._ops else []

    def wait(self) -> None:
        """Complete the batch in flight, if any."""
        if self._requests is None:
            return
        for request in self._requests:
            request.wait()
        self._requests, self._ops = None, []


class RingComm:
    """Send tensors to the next rank of the ring and receive the previous rank's, asynchronously.

    ``start(tensors)`` posts one batched send/receive and returns the receive buffers at once, so the caller can
    compute on the current block while the next one is in flight; ``wait()`` completes the exchange. One exchange may
    be in flight per ``RingComm``; schedules that move two streams (K/V forward, dK/dV back) use two.
    """

    def __init__(self, group=None, tag: int = 0):
        self.exchange = PeerExchange(group)
        self.tag = tag
        self.rank, self.world_size = self.exchange.rank, self.exchange.world_size
        self.send_to = (self.rank + 1) % self.world_size
        self.recv_from = (self.rank - 1) % self.world_size

    def start(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        for t in tensors:
            self.exchange.send(t, self.send_to, self.tag)
        buffers = [self.exchange.recv(t, self.recv_from, self.tag) for t in tensors]
        self.exchange.start()
        return buffers

    def wait(self) -> None:
        self.exchange.wait()
