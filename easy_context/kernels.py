"""The block primitive every schedule is built from, and the merge that folds blocks together.

Tensor layout, everywhere in this module:

* ``q``: ``(B, H, Sq, D)``; ``k``, ``v``: ``(B, H_kv, Sk, D)`` with ``H % H_kv == 0`` (GQA/MQA are native: K/V are
  never repeated by the caller, a backend that needs it repeats locally and sums the gradients back).
* ``out``: ``(B, H, Sq, D)`` in the dtype of ``q``; ``lse``: ``(B, H, Sq)`` in float32, natural log.

``causal=True`` is only defined for square blocks (``Sq == Sk``): the schedules only ever need the diagonal block
causally masked, and this keeps every backend's alignment convention (top-left vs bottom-right) out of the question.

Packed documents: ``q_docs`` and ``k_docs`` give the document id of every query row and key row (``(Sq,)`` and
``(Sk,)``, or ``(B, Sq)`` and ``(B, Sk)`` when the rows of a batch are packed differently), non-decreasing along the
sequence. A query then attends only to keys of its own document: the block splits into sub-blocks of the documents
both sides hold, each computed by the fused kernel (see :func:`document_sub_blocks`; on a diagonal block, one causal
square per document), so the work is the sum of the sub-blocks' sizes and a block that shares no document calls no
kernel. Query rows whose
document has no key in the block get ``out = 0`` and ``lse = -inf``, which :func:`merge` treats as empty.

Backends (chosen per call by :func:`select_backend`, or forced with ``EASY_CONTEXT_ATTN_BACKEND``):

``torch_cpu``    ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (any CPU, fp32/bf16/fp16).
``torch_flash``  ``aten._scaled_dot_product_flash_attention`` and its backward: PyTorch's own flash kernel (CUDA,
                 fp16/bf16, head dim <= 256 and a multiple of 8, sm80 or newer). GQA native: K/V keep ``H_kv`` heads.
``torch_cudnn``  ``aten._scaled_dot_product_cudnn_attention`` and its backward: cuDNN attention (CUDA with cuDNN 9,
                 fp16/bf16, head dim <= 256 and a multiple of 8), where the build has the op. GQA native. Only when
                 forced: PyTorch itself gates it per cuDNN version and GPU.
``torch_cuda``   ``aten._scaled_dot_product_efficient_attention`` and its backward: memory-efficient attention (CUDA,
                 any dtype; float32 and every shape the flash kernels refuse). The op takes equal head counts, so
                 for GQA K/V are repeated locally to ``H`` heads and their gradients summed back.
``flash_attn``   the ``flash_attn`` package (CUDA, fp16/bf16, head dim <= 256), when it is installed. GQA native.
``math``         plain matrix products in float32: the reference and the fallback for any other device.

Automatic choice (:func:`choose_backend`): CPU -> ``torch_cpu``; CUDA fp16/bf16 with head dim <= 256 and a multiple of
8 on sm80 or newer -> ``flash_attn`` when installed, else ``torch_flash``; any other CUDA case (float32, larger or odd
head dims, GPUs before sm80, head dims above 192 on sm86/sm89/sm120 whose flash backward refuses them) ->
``torch_cuda``; any other device -> ``math``. ``EASY_CONTEXT_ATTN_BACKEND`` (or a method's
``backend=`` option) forces one of :data:`BACKENDS`; a forced CUDA backend is checked against the dtype and head dim
and refused with a ``ValueError`` that names the fix.

All the fused kernels mask ``causal`` blocks top-left aligned, which on the square blocks used here is the only
alignment there is. Their backward ops take philox seed/offset tensors for dropout; dropout is always 0 here, so the
tensors are placeholders of the shapes the forward ops return.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "count_block_work",
    "block_attention",
    "document_ids",
    "block_attention_backward",
    "choose_backend",
    "merge",
    "select_backend",
    "softmax_scale",
]

BACKENDS = ("torch_cpu", "torch_flash", "torch_cudnn", "torch_cuda", "flash_attn", "math")
CUDA_BACKENDS = ("torch_flash", "torch_cudnn", "torch_cuda", "flash_attn")
_HALF = (torch.float16, torch.bfloat16)
_ENV_BACKEND = "EASY_CONTEXT_ATTN_BACKEND"


# ----------------------------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flash_attn_module():
    try:
        from flash_attn import flash_attn_interface  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_interface


def _cudnn_attention_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)


def _flash_shape_problem(name: str, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why the flash-type backend ``name`` cannot take ``dtype`` / ``head_dim``, or ``None``."""
    if dtype not in _HALF:
        return (f"attention backend {name!r} needs float16 or bfloat16, got {dtype}: use backend 'torch_cuda' "
                f"(memory-efficient attention) for {dtype}, or unset {_ENV_BACKEND} to choose automatically")
    if head_dim > 256 or head_dim % 8:
        return (f"attention backend {name!r} needs a head dim <= 256 and a multiple of 8, got {head_dim}: use "
                f"backend 'torch_cuda', or unset {_ENV_BACKEND} to choose automatically")
    return None


def _device_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def choose_backend(device, dtype: torch.dtype, head_dim: int, backend: Optional[str] = None,
                   capability: Optional[Tuple[int, int]] = None) -> str:
    """The backend for blocks on ``device`` (a ``torch.device`` or a name such as ``"cuda"``) of ``dtype``/``head_dim``.

    ``backend`` if given, else ``$EASY_CONTEXT_ATTN_BACKEND``, else automatic (see the module notes). ``capability``
    is the CUDA compute capability; ``None`` reads it from the device when CUDA is present and otherwise assumes a
    GPU the flash kernels support (sm80 or newer). A forced backend that cannot run the block raises ``ValueError``
    (``ImportError`` for a missing flash-attn package).
    """
    device = torch.device(device)
    backend = backend or os.environ.get(_ENV_BACKEND) or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend == "flash_attn" and _flash_attn_module() is None:
            raise ImportError(
                "attention backend 'flash_attn' needs the flash-attn package: pip install 'easy-context[cuda]' "
                "(CUDA only), or use backend 'torch_flash' / 'torch_cuda' / 'torch_cpu'"
            )
        if backend == "torch_cudnn" and _cudnn_attention_op() is None:
            raise ValueError(f"attention backend 'torch_cudnn' needs aten._scaled_dot_product_cudnn_attention, which "
                             f"torch {torch.__version__} does not have: use backend 'torch_flash' or 'torch_cuda'")
        if backend in CUDA_BACKENDS and device.type == "cpu":
            raise ValueError(f"attention backend {backend!r} runs on CUDA tensors, got a CPU tensor: use backend "
                             f"'torch_cpu', or unset {_ENV_BACKEND} to choose automatically")
        if backend in ("torch_flash", "torch_cudnn", "flash_attn"):
            problem = _flash_shape_problem(backend, dtype, head_dim)
            if problem:
                raise ValueError(problem)
        return backend
    if device.type == "cpu":
        return "torch_cpu"
    if device.type == "cuda":
        capability = tuple(capability or _device_capability(device) or (8, 0))
        # The flash kernels' backward takes head dims above 192 only on sm80/sm90-class GPUs (not sm86, sm89, sm120).
        small_smem = capability in ((8, 6), (8, 9), (12, 0)) and head_dim > 192
        if _flash_shape_problem("torch_flash", dtype, head_dim) is None and capability >= (8, 0) and not small_smem:
            return "flash_attn" if _flash_attn_module() is not None else "torch_flash"
        return "torch_cuda"
    return "math"


def select_backend(q: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend used for the block with queries ``q``: :func:`choose_backend` for its device, dtype and head dim."""
    return choose_backend(q.device, q.dtype, q.shape[-1], backend)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"block attention takes 4-D (B, H, S, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"key and value shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal block attention needs a square block, got {q.shape[2]} queries and {k.shape[2]} keys: "
            "split the block into a full part and a square causal part"
        )


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(2)


# ----------------------------------------------------------------------------------------------------------------------
# Instrumentation: how much attention work each process does (used to measure a schedule's load balance)
# ----------------------------------------------------------------------------------------------------------------------
class BlockWork:
    """Counts forward block calls and their work in query-key pairs (a causal block counts half)."""

    def __init__(self) -> None:
        self.calls = 0
        self.pairs = 0.0

    def add(self, sq: int, sk: int, causal: bool) -> None:
        self.calls += 1
        self.pairs += sq * sk * (0.5 if causal else 1.0)


_WORK_COUNTERS: List[BlockWork] = []


@contextlib.contextmanager
def count_block_work() -> Iterator[BlockWork]:
    """Within the ``with`` block, count every :func:`block_attention` call of this process."""
    counter = BlockWork()
    _WORK_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _WORK_COUNTERS.remove(counter)


# ----------------------------------------------------------------------------------------------------------------------
# Public primitive
# ----------------------------------------------------------------------------------------------------------------------
def softmax_scale(q: torch.Tensor, scale: Optional[float] = None) -> float:
    """``scale``, or the usual ``1 / sqrt(head dim)`` of ``q`` when it is ``None``."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document id of every token of a full sequence from its ``position_ids`` (``(S,)`` or ``(B, S)``).

    A document starts at the first token and wherever the positions do not continue by one (they restart, usually at
    0, as ``DataCollatorWithFlattening`` writes them). Ids count documents from 0 along each row.
    """
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[..., 1:] = (position_ids.diff(dim=-1) != 1).long()
    return starts.cumsum(-1) - 1


SubBlock = Tuple[int, int, int, int, bool]  # query rows [q0, q1) x key rows [k0, k1), causal square or full


def _runs(docs: torch.Tensor) -> dict:
    """``{doc id: (start, end)}`` of a non-decreasing 1-D tensor of document ids."""
    ids, counts = torch.unique_consecutive(docs.cpu(), return_counts=True)
    ids, counts = ids.tolist(), counts.tolist()
    if len(set(ids)) != len(ids) or ids != sorted(ids):
        raise ValueError("document ids must be non-decreasing along the sequence (each document one run of rows)")
    runs, start = {}, 0
    for doc, n in zip(ids, counts):
        runs[doc] = (start, start + n)
        start += n
    return runs


def document_sub_blocks(q_docs: torch.Tensor, k_docs: torch.Tensor, causal: bool) -> List[SubBlock]:
    """The fused-kernel calls that make up one block under document ids (1-D): ``(q0, q1, k0, k1, causal)``.

    Without ``causal`` each document both sides hold is one full sub-block. With ``causal`` (key row ``i`` visible to
    query row ``j`` when ``i <= j``), a document held at query rows ``[qs, qe)`` and key rows ``[ks, ke)`` gives at
    most three pieces: keys before all its queries (full), the rows and keys it holds at the same indices (square
    causal), and queries after all its keys (full). On a diagonal block (same ids on both sides) that is one causal
    square per document. A query row may meet two pieces; their results are merged.
    """
    q_runs, k_runs = _runs(q_docs), _runs(k_docs)
    subs: List[SubBlock] = []
    for d, (qs, qe) in q_runs.items():
        if d not in k_runs:
            continue
        ks, ke = k_runs[d]
        if not causal:
            subs.append((qs, qe, ks, ke, False))
            continue
        if ks < qs:  # keys before every query of the document
            subs.append((qs, qe, ks, min(ke, qs), False))
        lo, hi = max(qs, ks), min(qe, ke)
        if lo < hi:  # same indices on both sides: the causal square
            subs.append((lo, hi, lo, hi, True))
            if hi < qe:  # queries after every key of the document, against the square's keys
                subs.append((hi, qe, lo, hi, False))
    return subs


def _per_row_docs(docs: torch.Tensor, batch: int) -> Optional[List[torch.Tensor]]:
    """``None`` when one 1-D id vector holds for the whole batch, else one vector per batch row."""
    if docs.dim() == 1:
        return None
    if docs.dim() != 2 or docs.shape[0] not in (1, batch):
        raise ValueError(f"document ids must be (S,) or (B, S) with B={batch}, got {tuple(docs.shape)}")
    if docs.shape[0] == 1 or bool((docs == docs[:1]).all()):
        return None
    return list(docs)


def _first_row(docs: torch.Tensor) -> torch.Tensor:
    return docs if docs.dim() == 1 else docs[0]


def _document_forward(q, k, v, causal, scale, backend, q_docs, k_docs):
    rows = _per_row_docs(q_docs, q.shape[0]), _per_row_docs(k_docs, q.shape[0])
    if rows[0] is not None or rows[1] is not None:  # rows of the batch packed differently: one row at a time
        parts = [_document_forward(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal, scale, backend,
                                   _first_row(q_docs[b] if q_docs.dim() == 2 and q_docs.shape[0] > 1 else q_docs),
                                   _first_row(k_docs[b] if k_docs.dim() == 2 and k_docs.shape[0] > 1 else k_docs))
                 for b in range(q.shape[0])]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    subs = document_sub_blocks(_first_row(q_docs), _first_row(k_docs), causal)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    forward = _FORWARD[select_backend(q, backend)]
    for q0, q1, k0, k1, sub_causal in subs:
        for counter in _WORK_COUNTERS:
            counter.add(q1 - q0, k1 - k0, sub_causal)
        sub_out, sub_lse = forward(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], sub_causal, scale)
        merge(out[:, :, q0:q1], lse[:, :, q0:q1], sub_out, sub_lse)
    return out.to(q.dtype), lse


def _document_backward(dout, q, k, v, out, lse, causal, scale, backend, q_docs, k_docs):
    rows = _per_row_docs(q_docs, q.shape[0]), _per_row_docs(k_docs, q.shape[0])
    if rows[0] is not None or rows[1] is not None:
        parts = [_document_backward(dout[b:b + 1], q[b:b + 1], k[b:b + 1], v[b:b + 1], out[b:b + 1], lse[b:b + 1],
                                    causal, scale, backend,
                                    _first_row(q_docs[b] if q_docs.dim() == 2 and q_docs.shape[0] > 1 else q_docs),
                                    _first_row(k_docs[b] if k_docs.dim() == 2 and k_docs.shape[0] > 1 else k_docs))
                 for b in range(q.shape[0])]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))
    subs = document_sub_blocks(_first_row(q_docs), _first_row(k_docs), causal)
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    backward = _BACKWARD[select_backend(q, backend)]
    for q0, q1, k0, k1, sub_causal in subs:
        dq_s, dk_s, dv_s = backward(dout[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                    out[:, :, q0:q1], lse[:, :, q0:q1].contiguous(), sub_causal, scale)
        dq[:, :, q0:q1] += dq_s
        dk[:, :, k0:k1] += dk_s
        dv[:, :, k0:k1] += dv_s
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _checked_scale(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: Optional[float],
                   q_docs: Optional[torch.Tensor], k_docs: Optional[torch.Tensor]) -> float:
    """Validate a block's arguments; returns its softmax scale."""
    _check(q, k, v, causal)
    if (q_docs is None) != (k_docs is None):
        raise ValueError("give document ids for both the query rows and the key rows, or for neither")
    return softmax_scale(q, scale)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: Optional[float] = None, backend: Optional[str] = None,
                    q_docs: Optional[torch.Tensor] = None,
                    k_docs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attend one block of queries to one block of keys. Returns ``(out, lse)``; no autograd graph is recorded.

    With ``q_docs`` and ``k_docs`` (document ids of the query and key rows) a query attends only to keys of its own
    document, computed one shared document at a time (see the module notes).
    """
    scale = _checked_scale(q, k, v, causal, scale, q_docs, k_docs)
    with torch.no_grad():
        if q_docs is not None:
            return _document_forward(q, k, v, causal, scale, backend, q_docs, k_docs)
        for counter in _WORK_COUNTERS:
            counter.add(q.shape[2], k.shape[2], causal)
        return _FORWARD[select_backend(q, backend)](q, k, v, causal, scale)


def block_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
                             backend: Optional[str] = None, q_docs: Optional[torch.Tensor] = None,
                             k_docs: Optional[torch.Tensor] = None,
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of one block.

    ``out`` and ``lse`` may be the *final* merged values of the query rows rather than this block's own: the softmax
    probabilities are then the globally normalised ones, so the block's gradients are its exact share of the total.
    This is what makes every schedule's backward a sum of independent block backwards. ``q_docs`` / ``k_docs`` as
    in :func:`block_attention`; rows outside every shared document get zero gradients.
    """
    scale = _checked_scale(q, k, v, causal, scale, q_docs, k_docs)
    with torch.no_grad():
        if q_docs is not None:
            return _document_backward(dout, q, k, v, out.to(q.dtype), lse.float(), causal, scale, backend,
                                      q_docs, k_docs)
        return _BACKWARD[select_backend(q, backend)](dout, q, k, v, out.to(q.dtype), lse.float(), causal, scale)


def merge(
    out: Optional[torch.Tensor],
    lse: Optional[torch.Tensor],
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold a block's ``(block_out, block_lse)`` into the running ``(out, lse)``, in float32.

    Uses the stable form ``out -= sigmoid(block_lse - lse) * (out - block_out)``,
    ``lse -= logsigmoid(lse - block_lse)``. With ``out=None`` it starts a new running result. ``out`` and ``lse`` are
    updated in place when they are float32 (so they may be views into a larger buffer) and also returned. Rows whose
    running ``lse`` is ``-inf`` (nothing attended yet) take the block's values.
    """
    block_out = block_out.float()
    block_lse = block_lse.float()
    if out is None:
        return block_out.clone(), block_lse.clone()
    # Where the running result is empty the block's weight is 1; where the block is empty it is 0.
    run_empty, block_empty = torch.isneginf(lse), torch.isneginf(block_lse)
    weight = torch.sigmoid(block_lse - lse)
    weight = torch.where(run_empty, 1.0, torch.where(block_empty, 0.0, weight))
    new_lse = torch.where(run_empty | block_empty, torch.maximum(lse, block_lse), lse - F.logsigmoid(lse - block_lse))
    out.sub_(weight.unsqueeze(-1) * (out - block_out))
    lse.copy_(new_lse)
    return out, lse


# ----------------------------------------------------------------------------------------------------------------------
# torch_cpu: PyTorch's fused CPU kernel, which returns the LSE and handles GQA natively
# ----------------------------------------------------------------------------------------------------------------------
def _cpu_forward(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out, lse, 0.0, causal, scale=scale
    )


# ----------------------------------------------------------------------------------------------------------------------
# torch_cuda: memory-efficient attention (all dtypes); K/V repeated locally for GQA: the op's contract is equal head
# counts (its meta kernel gives dK/dV the query's heads; SDPA passes it fewer KV heads only on some builds)
# ----------------------------------------------------------------------------------------------------------------------
def _cuda_forward(q, k, v, causal, scale):
    groups = q.shape[1] // k.shape[1]
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), None, True, 0.0, causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]  # the kernel pads the LSE's sequence dimension


def _cuda_backward(dout, q, k, v, out, lse, causal, scale):
    groups = q.shape[1] // k.shape[1]
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    kr, vr = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if torch.version.hip is None:  # the CUDA kernel reads the LSE with its sequence dimension padded to 32
        lse = F.pad(lse, (0, -lse.shape[-1] % 32))
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(), q, kr, vr, None, out, lse.contiguous(), seed, seed, 0.0, [True, True, True, False], causal,
        scale=scale,
    )
    return dq, _sum_kv(dk, groups), _sum_kv(dv, groups)


# ----------------------------------------------------------------------------------------------------------------------
# torch_flash: PyTorch's flash kernel (FlashAttention-2). The op takes (B, H, S, D) and fewer K/V heads (GQA/MQA); its
# LSE is (B, H, Sq) float32. Dense inputs: no cumulative sequence lengths; the max lengths are the block's.
# ----------------------------------------------------------------------------------------------------------------------
def _torch_flash_forward(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _torch_flash_backward(dout, q, k, v, out, lse, causal, scale):
    # The kernel reads the philox state only with dropout; these are the placeholders its forward returns without it.
    rng_state = torch.empty((2,), dtype=torch.uint64, device=q.device)
    unused = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0,
        causal, rng_state, unused, scale=scale,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# torch_cudnn: cuDNN attention. GQA native; contiguous (B, H, S, D) inputs; the LSE is (B, H, Sq, 1) float32.
# ----------------------------------------------------------------------------------------------------------------------
def _torch_cudnn_forward(q, k, v, causal, scale):
    out, lse = _cudnn_attention_op()(q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, False,
                                     scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])


def _torch_cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.contiguous().unsqueeze(-1), seed, seed, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
        scale=scale,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# flash_attn: the flash-attn package. Its private forward/backward changed signature across 2.x releases, so
# arguments are passed by the names each release declares.
# ----------------------------------------------------------------------------------------------------------------------
def _call_by_name(fn, **kwargs):
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        kwargs["window_size"] = (kwargs.get("window_size_left", -1), kwargs.get("window_size_right", -1))
    return fn(**{name: value for name, value in kwargs.items() if name in params})


def _flash_forward(q, k, v, causal, scale):
    fa = _flash_attn_module()
    ret = _call_by_name(
        fa._flash_attn_forward,
        q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2), dropout_p=0.0, softmax_scale=scale,
        causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
        return_softmax=False,
    )
    out, lse = ret[0], (ret[1] if len(ret) == 4 else ret[5])
    return out.transpose(1, 2), lse


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    fa = _flash_attn_module()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    _call_by_name(
        fa._flash_attn_backward,
        dout=dout.transpose(1, 2).contiguous(), q=qt, k=kt, v=vt, out=out.transpose(1, 2), softmax_lse=lse,
        dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1,
        window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# math: explicit float32 matrix products. Any device; also the readable statement of what the kernels compute.
# ----------------------------------------------------------------------------------------------------------------------
def _math_scores(q, k, causal, scale):
    b, h, sq, d = q.shape
    hk = k.shape[1]
    qg = q.float().view(b, hk, h // hk, sq, d)
    s = torch.einsum("bkgqd,bksd->bkgqs", qg, k.float()) * scale
    if causal:
        s = s.masked_fill(torch.ones(sq, sq, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    return s


def _math_forward(q, k, v, causal, scale):
    b, h, sq, d = q.shape
    s = _math_scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # a fully masked row attends nothing: out 0, lse -inf
    out = torch.einsum("bkgqs,bksd->bkgqd", p, v.float())
    return out.reshape(b, h, sq, d).to(q.dtype), lse.reshape(b, h, sq)


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    b, h, sq, d = q.shape
    hk = k.shape[1]
    s = _math_scores(q, k, causal, scale)
    p = torch.exp(s - lse.view(b, hk, h // hk, sq, 1)).nan_to_num(0.0)
    do = dout.float().view(b, hk, h // hk, sq, d)
    delta = (do * out.float().view(b, hk, h // hk, sq, d)).sum(-1, keepdim=True)
    dp = torch.einsum("bkgqd,bksd->bkgqs", do, v.float())
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bkgqs,bksd->bkgqd", ds, k.float()).reshape(b, h, sq, d)
    dk = torch.einsum("bkgqs,bkgqd->bksd", ds, q.float().view(b, hk, h // hk, sq, d))
    dv = torch.einsum("bkgqs,bkgqd->bksd", p, do)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_FORWARD = {
    "torch_cpu": _cpu_forward,
    "torch_flash": _torch_flash_forward,
    "torch_cudnn": _torch_cudnn_forward,
    "torch_cuda": _cuda_forward,
    "flash_attn": _flash_forward,
    "math": _math_forward,
}
_BACKWARD = {
    "torch_cpu": _cpu_backward,
    "torch_flash": _torch_flash_backward,
    "torch_cudnn": _torch_cudnn_backward,
    "torch_cuda": _cuda_backward,
    "flash_attn": _flash_backward,
    "math": _math_backward,
}
