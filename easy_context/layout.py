"""How a sequence is split over the ranks of a sequence-parallel group, and put back together.

A layout is defined by one function, ``indices(seq_len, rank, world_size)``: the global token positions rank ``rank``
holds, in local order. Sharding gathers those positions; unsharding scatters every rank's shard back. Each layout
also names the multiple the sequence length must be divisible by.

========== ========================================= ===================
layout     rank r of P holds                         length multiple
========== ========================================= ===================
contiguous chunk r of P                              P
zigzag     chunks r and 2P-1-r of 2P                 2P
stripe     tokens r, r+P, r+2P, ...                  P
========== ========================================= ===================
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["Layout", "CONTIGUOUS", "ZIGZAG", "STRIPE", "padded_length"]


def padded_length(seq_len: int, multiple: int) -> int:
    return -(-seq_len // multiple) * multiple


class Layout:
    """Base class: subclasses define :meth:`indices` and :meth:`multiple`."""

    name = "layout"

    def multiple(self, world_size: int) -> int:
        raise NotImplementedError

    def _indices(self, seq_len: int, rank: int, world_size: int) -> torch.Tensor:
        raise NotImplementedError

    def check_length(self, seq_len: int, world_size: int, method: str = "") -> None:
        m = self.multiple(world_size)
        if seq_len % m:
            what = f" ({method}, {self.name} layout)" if method else f" ({self.name} layout)"
            raise ValueError(
                f"sequence length {seq_len} is not divisible by {self._multiple_text(world_size)}={m}{what}: "
                f"pad to {padded_length(seq_len, m)} (prepare_seq_parallel_inputs(..., pad_to_multiple_of={m}) or "
                f"pad=True; padded targets are -100)"
            )

    def _multiple_text(self, world_size: int) -> str:
        return "world_size"

    def indices(self, seq_len: int, rank: int, world_size: int, device=None) -> torch.Tensor:
        """Global positions held by ``rank``, in local order."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the group of {world_size}")
        self.check_length(seq_len, world_size)
        return self._indices(seq_len, rank, world_size).to(device)

    def shard(self, x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
        """The part of ``x`` (full sequence along ``dim``) that ``rank`` holds."""
        idx = self.indices(x.shape[dim], rank, world_size, device=x.device)
        return x.index_select(dim, idx)

    def unshard(self, shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: ``shards[r]`` is rank r's part; returns the full sequence along ``dim``."""
        world_size = len(shards)
        seq_len = sum(s.shape[dim] for s in shards)
        local = torch.cat(list(shards), dim=dim)
        order = torch.cat([self.indices(seq_len, r, world_size) for r in range(world_size)]).to(local.device)
        out = torch.empty_like(local)
        return out.index_copy_(dim, order, local)


class _Contiguous(Layout):
    name = "contiguous"

    def multiple(self, world_size: int) -> int:
        return world_size

    def _indices(self, seq_len, rank, world_size):
        n = seq_len // world_size
        return torch.arange(rank * n, (rank + 1) * n)


class _Zigzag(Layout):
    name = "zigzag"

    def multiple(self, world_size: int) -> int:
        return 2 * world_size

    def _multiple_text(self, world_size: int) -> str:
        return "2*world_size"

    def _indices(self, seq_len, rank, world_size):
        n = seq_len // (2 * world_size)
        first = torch.arange(rank * n, (rank + 1) * n)
        second = torch.arange((2 * world_size - 1 - rank) * n, (2 * world_size - rank) * n)
        return torch.cat([first, second])


class _Stripe(Layout):
    name = "stripe"

    def multiple(self, world_size: int) -> int:
        return world_size

    def _indices(self, seq_len, rank, world_size):
        return torch.arange(rank, seq_len, world_size)


CONTIGUOUS: Layout = _Contiguous()
ZIGZAG: Layout = _Zigzag()
STRIPE: Layout = _Stripe()
