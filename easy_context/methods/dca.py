"""Dual Chunk Attention (DCA, "ChunkLlama"): training-free context extension.

An et al. 2024, *Training-Free Long-Context Scaling of Large Language Models*. A RoPE model pretrained on sequences
of length ``L`` has only ever seen relative positions ``0 .. L-1``. DCA keeps every relative position a query and a
key meet below ``L``, at any sequence length, by splitting the sequence into chunks of ``s`` tokens and giving
queries three different position schemes depending on which chunk the key lies in.

Notation (the paper's): ``s`` chunk size, ``w`` local window, ``c = L`` pretraining length, so the largest position
any query or key uses is ``c - 1``. A token at absolute position ``p`` is in chunk ``p // s`` at in-chunk offset
``p % s``. For a query at ``i`` and a key at ``j <= i``:

====================  =========================  ====================================================================
key lies in           query position             relative distance seen by the model
====================  =========================  ====================================================================
the query's chunk     ``P_intra = i % s``        ``i - j``: the true distance (< s), causal
(intra-chunk)
the previous chunk    ``P_succ = s + i % s`` if  ``s + i % s - j % s = i - j`` (true) for the first ``w`` queries of
(successive chunk)    ``i % s < w``, else        a chunk, so neighbouring tokens across a chunk boundary keep their
                      ``c - 1``                  real distance; ``c - 1 - j % s`` (in ``[c - s, c - 1]``) after that
any earlier chunk     ``P_inter = c - 1``        ``c - 1 - j % s``, in ``[c - s, c - 1]``: "far away", never beyond
(inter-chunk)                                    what pretraining saw
====================  =========================  ====================================================================

Keys always use ``P_k = j % s`` (their position within their chunk). With ``w = c - s`` the successive scheme is
``min(s + i % s, c - 1)``: every query of a chunk keeps true distances to the previous chunk as far as they fit.

**Defaults** (:class:`DCAConfig`): ``s = 3L/4`` and ``w = L/8``. ``s = 3L/4`` is the reference implementation's chunk
size: chunks stay well inside the pretraining length, so the inter-chunk distances ``[c - s, c - 1] = [L/4, L - 1]``
are all positions the model was trained on and clearly "far" compared to the in-chunk ones. ``w = L/8`` keeps the true
distance across a chunk boundary for the first ``L/8`` queries of every chunk (ChunkLlama's script uses ``L/16``);
any ``w <= c - s`` is valid, and ``w = c - s`` gives the ``min`` form above. (ChunkLlama's script uses the ``min``
form with chunks of ``3L/4 - w`` tokens and ``3L/4`` as its largest position; here the paper's formulas are used with
``c = L``, so the parameters mean what the paper says.)

How it is computed here. transformers hands the attention function ``q`` and ``k`` already rotated by RoPE at their
*true* positions (keys from the KV cache too). Rotations compose, ``R(a) R(b) = R(a + b)``, so a vector rotated at
``p`` is moved to DCA position ``t`` by applying ``R(t - p)``; the angle ``(t - p) * inv_freq`` is computed in
float64, and any attention scaling (YaRN) that transformers folded into ``q``/``k`` is kept. The frequencies are the
ones the model's rotary embedding actually uses (linear/PI scaling, YaRN and Llama-3 scaling change them).

The attention itself is a schedule over the package's block primitive: per query chunk, one (bottom-right causal)
intra-chunk block, one full block against the previous chunk and one full block against all earlier chunks, merged
with :func:`easy_context.kernels.merge`. Memory is linear in the sequence length apart from the blocks themselves.
:class:`DualChunkAttention` is an autograd Function whose backward runs :func:`block_attention_backward` per block
with the final merged ``(out, lse)``, so gradients are exact; the re-rotations are ordinary differentiable tensor
operations outside it.

Decoding with a KV cache. A key's DCA position ``j % s`` depends on its own index only, so its DCA-rotated copy never
changes once the key is in the cache. With ``cache_rotated_keys=True`` (the default) each attention layer keeps the
rotated keys of the ``DynamicCache`` it is decoding with (:class:`_RotatedKeys`, one more K-sized tensor per layer),
rotates only the keys that enter the cache at each step, and reuses the rest; queries still get their three rotations.
The state is keyed by the cache object and the attention module and is recomputed whenever the cache's key tensor is
not the one the layer saw last (a new cache, a cropped or reordered one, beam search), so it can never go stale.
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from ..checks import padding_mask_refuser, reject_unsupported_features
from ..kernels import block_attention, block_attention_backward, merge, softmax_scale
from ..model_config import text_config
from .base import Method, register

__all__ = [
    "DCAConfig",
    "dca_plan",
    "dual_chunk_attention",
    "DualChunkAttention",
    "dca_attention_forward",
    "dca_hf_attention",
    "rotated_key_bytes",
]

# Query position schemes (index into the tuple of rotated query variants).
INTRA, SUCC, INTER = 0, 1, 2
# RoPE types whose frequencies depend on the current sequence length: cached keys would have been rotated with other
# frequencies than the current query, and DCA never needs positions beyond the pretraining length anyway.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


# ----------------------------------------------------------------------------------------------------------------------
# Parameters and the position formulas
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DCAConfig:
    """DCA parameters: ``pretraining_length`` (``L = c``), ``chunk_size`` (``s``), ``local_window`` (``w``)."""

    pretraining_length: int
    chunk_size: int
    local_window: int

    @classmethod
    def create(cls, pretraining_length: int, chunk_size: Optional[int] = None,
               local_window: Optional[int] = None) -> "DCAConfig":
        """Fill in the defaults ``s = 3L/4`` and ``w = L/8`` (see the module docstring) and validate."""
        if pretraining_length is None or int(pretraining_length) < 2:
            raise ValueError(
                f"dca needs pretraining_length >= 2 (the model's trained context), got {pretraining_length}")
        length = int(pretraining_length)
        s = length * 3 // 4 if chunk_size is None else int(chunk_size)
        w = length // 8 if local_window is None else int(local_window)
        config = cls(length, s, w)
        config.validate()
        return config

    def validate(self) -> None:
        c, s, w = self.pretraining_length, self.chunk_size, self.local_window
        if not 1 <= s < c:
            raise ValueError(f"dca chunk_size must be in [1, pretraining_length) = [1, {c}), got {s}")
        if not 0 <= w <= c - s:
            raise ValueError(
                f"dca local_window must be in [0, pretraining_length - chunk_size] = [0, {c - s}] so that successive-"
                f"chunk positions s + i stay below pretraining_length, got {w}"
            )

    # Positions, for absolute token positions ``pos`` (an integer tensor).
    def key_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """``P_k = j % s``: a key's position within its chunk."""
        return pos % self.chunk_size

    def intra_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """``P_intra = i % s``: same chunk, so the distance to a key is the true one."""
        return pos % self.chunk_size

    def successive_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """``P_succ = s + i % s`` for ``i % s < w`` (true distance to the previous chunk), else ``c - 1``."""
        offset = pos % self.chunk_size
        far = torch.full_like(pos, self.pretraining_length - 1)
        return torch.where(offset < self.local_window, self.chunk_size + offset, far)

    def inter_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """``P_inter = c - 1``: every key two or more chunks back looks between ``c - s`` and ``c - 1`` away."""
        return torch.full_like(pos, self.pretraining_length - 1)


# ----------------------------------------------------------------------------------------------------------------------
# The schedule: which (query variant, query rows, key rows, causal) blocks make up DCA
# ----------------------------------------------------------------------------------------------------------------------
class Piece(NamedTuple):
    variant: int  # INTRA, SUCC or INTER: which rotated copy of the queries
    q: slice  # rows of the local queries
    kv: slice  # rows of the keys (absolute positions: key j is row j)
    causal: bool  # square causal block (diagonal) or full block


def dca_plan(q_start: int, q_len: int, chunk_size: int) -> List[Piece]:
    """Blocks for ``q_len`` queries at absolute positions ``q_start ..`` against keys ``0 .. q_start + q_len - 1``.

    Per query chunk ``g`` (rows ``[a, b)`` of chunk ``[g s, (g+1) s)``):

    * intra: keys ``[g s, b)``, causal and aligned bottom-right. Split into a full block for keys ``[g s, a)`` (only
      when the queries start mid-chunk, as with a KV cache) and a square causal block for keys ``[a, b)``; one full
      block when there is a single query mid-chunk (a decoding step);
    * successive: keys ``[(g-1) s, g s)``, full, when ``g >= 1``;
    * inter: keys ``[0, (g-1) s)``, full, when ``g >= 2``.
    """
    s, end = chunk_size, q_start + q_len
    pieces: List[Piece] = []
    for g in range(q_start // s, (end - 1) // s + 1):
        a, b = max(q_start, g * s), min(end, (g + 1) * s)
        rows = slice(a - q_start, b - q_start)
        if a > g * s and b - a == 1:  # one query (a decoding step): it sees every key of its chunk, one full block
            pieces.append(Piece(INTRA, rows, slice(g * s, b), False))
        else:
            if a > g * s:
                pieces.append(Piece(INTRA, rows, slice(g * s, a), False))
            pieces.append(Piece(INTRA, rows, slice(a, b), True))
        if g >= 1:
            pieces.append(Piece(SUCC, rows, slice((g - 1) * s, g * s), False))
        if g >= 2:
            pieces.append(Piece(INTER, rows, slice(0, (g - 1) * s), False))
    return pieces


def _run_plan(qs, k, v, plan: List[Piece], scale: float, backend) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of a plan: ``(out in the queries' dtype, lse float32)``."""
    q = qs[0]
    rows = q.shape[2]
    if len(plan) == 1 and plan[0].q == slice(0, rows):  # one block (decoding inside the first chunk): no merge
        p = plan[0]
        out, lse = block_attention(qs[p.variant], k[:, :, p.kv], v[:, :, p.kv], p.causal, scale, backend)
        return out.to(q.dtype), lse.float()
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for p in plan:
        block_out, block_lse = block_attention(qs[p.variant][:, :, p.q], k[:, :, p.kv], v[:, :, p.kv], p.causal,
                                               scale, backend)
        merge(out[:, :, p.q], lse[:, :, p.q], block_out, block_lse)
    return out.to(q.dtype), lse


class DualChunkAttention(torch.autograd.Function):
    """Runs a :func:`dca_plan` over the three rotated query copies and the rotated keys; returns ``(out, lse)``.

    Inputs are ``(B, H, Sq, D)`` queries (three position variants) and ``(B, H_kv, Skv, D)`` keys/values. Backward
    computes each block's exact share of the gradients from the final merged ``(out, lse)``.
    """

    @staticmethod
    def forward(ctx, q_intra, q_succ, q_inter, k, v, plan: List[Piece], scale: float, backend):
        out, lse = _run_plan((q_intra, q_succ, q_inter), k, v, plan, scale, backend)
        ctx.save_for_backward(q_intra, q_succ, q_inter, k, v, out, lse)
        ctx.args = (plan, scale, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q_intra, q_succ, q_inter, k, v, out, lse = ctx.saved_tensors
        plan, scale, backend = ctx.args
        qs = (q_intra, q_succ, q_inter)
        dout = dout.contiguous()
        dqs = [torch.zeros(q.shape, dtype=torch.float32, device=q.device) for q in qs]
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        for p in plan:
            dq_p, dk_p, dv_p = block_attention_backward(
                dout[:, :, p.q], qs[p.variant][:, :, p.q], k[:, :, p.kv], v[:, :, p.kv],
                out[:, :, p.q], lse[:, :, p.q], p.causal, scale, backend,
            )
            dqs[p.variant][:, :, p.q] += dq_p
            dk[:, :, p.kv] += dk_p
            dv[:, :, p.kv] += dv_p
        return (*(dq.to(q.dtype) for dq, q in zip(dqs, qs)), dk.to(k.dtype), dv.to(v.dtype), None, None, None)


# ----------------------------------------------------------------------------------------------------------------------
# Re-rotation: move vectors rotated at their true positions to DCA positions
# ----------------------------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply the RoPE rotation ``R(delta)`` to ``x`` ``(B, H, S, D)``, ``delta`` ``(S,)`` position shifts.

    Uses transformers' "rotate_half" pairing (dimension ``d`` with ``d + D_rot/2``), as Llama, Mistral and Qwen2 do.
    When the rotary dimension ``2 * len(inv_freq)`` is smaller than ``D`` (partial rotary), only the leading part is
    rotated. The angles are computed in float64 (exact for any realistic shift); float16/bfloat16 vectors are rotated
    in float32 and rounded once.
    """
    return _apply_rotation(x, *_rotation(delta, inv_freq, x))


def _rotation(delta: torch.Tensor, inv_freq: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``(len(delta), rot_dim)`` of the shifts ``delta``, in the dtype ``x`` is rotated in."""
    rot_dim = 2 * inv_freq.shape[-1]
    if rot_dim > x.shape[-1]:
        raise ValueError(f"rotary dimension {rot_dim} exceeds head dimension {x.shape[-1]}")
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    angles = delta.to(x.device, wide)[:, None] * inv_freq.to(x.device, wide)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    # Half-precision inputs are rotated in float32 and rounded once at the end.
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return angles.cos().to(work), angles.sin().to(work)


def _apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot_dim = cos.shape[-1]
    head = x[..., :rot_dim].to(cos.dtype)
    head = (head * cos + _rotate_half(head) * sin).to(x.dtype)
    return head if rot_dim == x.shape[-1] else torch.cat((head, x[..., rot_dim:]), dim=-1)


# The last few (cos, sin) tables of short position ranges: every layer of a decoding step rotates its query and its
# new key by the same shifts, so the angles are computed once per step rather than once per layer.
_SHORT = 64
_TABLES: "dict" = {}


def _shift_table(kind: str, start: int, n: int, inv_freq: torch.Tensor, config: DCAConfig,
                 x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the shifts to the DCA positions of true positions ``start .. start + n - 1``: the key shifts
    (``kind="k"``), or the intra, successive and inter query shifts one after the other (``kind="q"``, ``3 n`` rows).
    """
    try:
        version = inv_freq._version
    except RuntimeError:  # an inference-mode tensor has no version counter: no reuse
        version, n_memo = None, 0
    else:
        n_memo = n
    key = (kind, start, n, id(inv_freq), version, inv_freq.device, inv_freq.dtype, config, x.device, x.dtype)
    memo = 0 < n_memo <= _SHORT
    if memo:
        hit = _TABLES.get(key)
        if hit is not None and hit[0]() is inv_freq:
            return hit[1]
    pos = torch.arange(start, start + n, device=x.device)
    if kind == "k":
        delta = config.key_positions(pos) - pos
    else:
        targets = (config.intra_positions(pos), config.successive_positions(pos), config.inter_positions(pos))
        delta = torch.cat(targets) - pos.repeat(3)
    table = _rotation(delta, inv_freq, x)
    if memo:
        if len(_TABLES) >= 8:
            _TABLES.clear()
        _TABLES[key] = (weakref.ref(inv_freq), table)
    return table


def rotate_keys(k: torch.Tensor, start: int, inv_freq: torch.Tensor, config: DCAConfig) -> torch.Tensor:
    """Rotate keys ``k`` ``(B, H, S, D)`` at true positions ``start .. start + S - 1`` to their DCA key positions."""
    return _apply_rotation(k, *_shift_table("k", start, k.shape[2], inv_freq, config, k))


def dual_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    config: DCAConfig,
    *,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    k_dca: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal Dual Chunk Attention. Returns ``(out (B, H, Sq, D), lse (B, H, Sq) float32)``; differentiable.

    ``k``/``v`` are ``(B, H_kv, Skv, D)`` for the tokens at positions ``0 .. Skv-1``, ``q`` ``(B, H, Sq, D)`` for the
    last ``Sq`` of them (``Sq == Skv`` in a plain forward, ``Sq < Skv`` with a KV cache). ``q`` and ``k`` are rotated
    by RoPE (frequencies ``inv_freq``) at those true positions, as transformers' attention functions receive them.
    ``k_dca``, when given, is ``k`` already rotated to the DCA key positions (:meth:`DCAConfig.key_positions`), as
    kept across decoding steps; ``k`` is then not rotated again.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"dual_chunk_attention takes 4-D (B, H, S, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len > kv_len:
        raise ValueError(f"dual_chunk_attention got {q_len} queries but only {kv_len} keys")
    scale = softmax_scale(q, scale)
    q_start = kv_len - q_len
    # Shifts t - p from the true position p to each DCA position t (see the table in the module docstring).
    # The three query shifts share one angle computation.
    cos, sin = _shift_table("q", q_start, q_len, inv_freq, config, q)
    q_intra, q_succ, q_inter = (_apply_rotation(q, cos[i * q_len:(i + 1) * q_len], sin[i * q_len:(i + 1) * q_len])
                                for i in range(3))
    if k_dca is None:
        k_dca = rotate_keys(k, 0, inv_freq, config)
    elif k_dca.shape != k.shape:
        raise ValueError(f"k_dca has shape {tuple(k_dca.shape)}, the keys {tuple(k.shape)}")
    plan = dca_plan(q_start, q_len, config.chunk_size)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q_intra, k_dca, v)):
        with torch.no_grad():  # no autograd Function: less overhead per decoding step
            return _run_plan((q_intra, q_succ, q_inter), k_dca, v, plan, scale, backend)
    return DualChunkAttention.apply(q_intra, q_succ, q_inter, k_dca, v.contiguous(), plan, scale, backend)


# ----------------------------------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------------------------------
class _ModelState(NamedTuple):
    config: DCAConfig
    rotary: "weakref.ref[torch.nn.Module]"  # the model's rotary embedding (its inv_freq is read at every call)
    cache_rotated_keys: bool = True


class _RotatedKeys:
    """One attention layer's DCA-rotated copy of the keys in one KV cache, grown as keys enter the cache.

    ``buffer[:, :, :length]`` holds the keys at positions ``0 .. length-1`` rotated to their DCA key positions;
    ``seen`` is the cache's key tensor they were computed from. The first buffer is the rotated prefill itself (no
    copy); once keys are appended it keeps a little headroom (1/16 of its length plus 16 rows) so that a decoding
    step writes one row instead of copying the whole tensor.
    """

    __slots__ = ("buffer", "length", "seen", "inv_freq", "config")

    def __init__(self, rotated: torch.Tensor, seen: torch.Tensor, inv_freq: torch.Tensor, config: DCAConfig):
        self.buffer = rotated
        self.length = rotated.shape[2]
        self.seen = weakref.ref(seen)
        self.inv_freq, self.config = inv_freq, config

    @staticmethod
    def _allocate(like: torch.Tensor, rows: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return torch.empty((b, h, rows + rows // 16 + 16, d), dtype=like.dtype, device=like.device)

    def matches(self, key: torch.Tensor, inv_freq: torch.Tensor, config: DCAConfig) -> bool:
        """Whether ``key`` (the cache's keys after this step's update) can extend what this state holds; the caller
        has checked that the cache held, before the update, the very key tensor this state was computed from."""
        buffer = self.buffer
        return (inv_freq is self.inv_freq and config == self.config and key.shape[2] > self.length
                and key.shape[:2] == buffer.shape[:2] and key.shape[3] == buffer.shape[3]
                and key.dtype == buffer.dtype and key.device == buffer.device)

    def extend(self, key: torch.Tensor) -> torch.Tensor:
        """Rotate the keys past ``length`` (the ones this step added), append them, return all rotated keys."""
        start, end = self.length, key.shape[2]
        new = rotate_keys(key[:, :, start:], start, self.inv_freq, self.config)
        if end > self.buffer.shape[2]:
            grown = self._allocate(self.buffer, end)
            grown[:, :, :start] = self.buffer[:, :, :start]
            self.buffer = grown
        self.buffer[:, :, start:end] = new
        self.length = end
        self.seen = weakref.ref(key)
        return self.buffer[:, :, :end]


# KV cache -> {attention module -> its _RotatedKeys}. Weak on both levels: a cache that is dropped (the end of a
# generate() call) frees its rotated keys, and two models or two caches never share an entry.
_ROTATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Attention module -> (cache, whether the cache still holds the key tensor that module's state was computed from) for
# the call under way. A forward pre-hook records it before the cache is updated, because transformers passes the cache
# to the attention layer but not to the attention function.
_PENDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_HOOKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cache_keys_before(cache, layer_idx) -> Optional[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx is None or not 0 <= layer_idx < len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    return keys if isinstance(keys, torch.Tensor) else None


def _record_cache(module, args, kwargs) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        _PENDING.pop(module, None)
        return
    before = _cache_keys_before(cache, getattr(module, "layer_idx", None))
    try:
        layers = _ROTATED.get(cache)
        state = None if layers is None else layers.get(module)
        same = before is not None and state is not None and state.seen() is before
        _PENDING[module] = (weakref.ref(cache), same)
    except TypeError:  # a cache that cannot be weakly referenced: no reuse
        _PENDING.pop(module, None)


def _hook(module) -> None:
    """Register the pre-hook that tells the attention function which cache (and which of its key tensors) it gets."""
    if module not in _HOOKED:
        _HOOKED[module] = module.register_forward_pre_hook(_record_cache, with_kwargs=True)


def _rotated_keys(module, key: torch.Tensor, inv_freq: torch.Tensor, config: DCAConfig) -> Optional[torch.Tensor]:
    """The DCA-rotated keys for ``key`` (the cache's keys after this step), reused from earlier steps when valid.

    Returns ``None`` (rotate everything, keep nothing) when the call has no cache or builds an autograd graph.
    """
    pending = _PENDING.pop(module, None)
    if pending is None or (torch.is_grad_enabled() and key.requires_grad):
        return None
    cache = pending[0]()
    if cache is None:
        return None
    layers = _ROTATED.get(cache)
    if layers is None:
        layers = weakref.WeakKeyDictionary()
        _ROTATED[cache] = layers
    state = layers.get(module)
    if state is not None and pending[1] and state.matches(key, inv_freq, config):
        return state.extend(key)
    rotated = rotate_keys(key, 0, inv_freq, config)
    layers[module] = _RotatedKeys(rotated, key, inv_freq, config)
    return rotated


def rotated_key_bytes(cache) -> int:
    """Bytes held by DCA's rotated-key state for ``cache`` (all layers, headroom included); 0 if none."""
    layers = _ROTATED.get(cache)
    return 0 if layers is None else sum(s.buffer.numel() * s.buffer.element_size() for s in layers.values())


# Every submodule of a patched model -> that model's DCA state. Keyed per model, so patching several models (each
# with its own options and rotary embedding) keeps each one right although transformers holds one function per name.
_MODEL_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelState]" = weakref.WeakKeyDictionary()
# Family-name patches: rotary embeddings rebuilt from a config, cached by the config object's id.
_CONFIG_ROTARY: dict = {}


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        return str(params.get("rope_type", params.get("type", "default")))
    scaling = getattr(config, "rope_scaling", None)  # transformers 4.x
    if isinstance(scaling, dict):
        return str(scaling.get("rope_type", scaling.get("type", "default")))
    return "default"


def _check_rope_type(rope_type: str) -> None:
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise ValueError(
            f"dca does not support rope_type {rope_type!r}: its frequencies change with the sequence length, so keys "
            "in the KV cache were rotated with other frequencies than the queries, and DCA already keeps every "
            "relative position below pretraining_length. Use the model's base RoPE (rope_type 'default'), or a "
            "static scaling ('linear', 'yarn', 'llama3')"
        )


def _default_pretraining_length(config) -> int:
    config = text_config(config)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    original = params.get("original_max_position_embeddings") if isinstance(params, dict) else None
    length = original or getattr(config, "max_position_embeddings", None)
    if not length:
        raise ValueError("dca needs pretraining_length=<the model's trained context length>")
    return int(length)


def _find_rotary(model) -> torch.nn.Module:
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if len(found) != 1:
        raise ValueError(
            f"dca needs exactly one rotary embedding module (with an inv_freq buffer) in the model, found "
            f"{len(found)}: it supports RoPE decoder models with one rotary embedding, such as Llama, Mistral and Qwen2"
        )
    return found[0]


def _rotary_from_config(module) -> torch.nn.Module:
    """Rebuild the rotary embedding of the model that ``module`` (an attention layer) belongs to, from its config."""
    config = module.config
    key = id(config)
    cached = _CONFIG_ROTARY.get(key)
    if cached is not None and cached[0]() is config:
        return cached[1]
    _check_rope_type(_rope_type(config))
    modeling = importlib.import_module(type(module).__module__)
    classes = [obj for name, obj in vars(modeling).items()
               if name.endswith("RotaryEmbedding") and isinstance(obj, type) and issubclass(obj, torch.nn.Module)]
    if len(classes) != 1:
        raise ValueError(
            f"dca patched by family name cannot find the rotary embedding of {type(module).__name__}: pass the model "
            "instance to apply_seq_parallel_monkey_patch('dca', model, ...)"
        )
    rotary = classes[0](config)
    _CONFIG_ROTARY[key] = (weakref.ref(config), rotary)
    return rotary


def dca_attention_forward(options, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):
    """transformers ``AttentionInterface`` function for DCA; returns ``((B, S, H, D), None)``."""
    state = _MODEL_STATES.get(module)
    if state is not None:
        config, rotary, reuse = state.config, state.rotary(), state.cache_rotated_keys
    else:  # a family-name patch: derive what is needed from the module's config
        length = options.get("pretraining_length") or _default_pretraining_length(module.config)
        config = DCAConfig.create(length, options.get("chunk_size"), options.get("local_window"))
        rotary = _rotary_from_config(module)
        reuse = options.get("cache_rotated_keys", True)
    if attention_mask is not None:
        raise ValueError(
            "dca cannot apply an explicit attention mask (padding, packed sequences or a custom 4-D mask): it always "
            "computes causal attention over one unpadded sequence per batch row. Drop the mask, or pad at the end"
        )
    reject_unsupported_features("dca", dropout, kwargs)
    if not getattr(module, "is_causal", True):
        raise ValueError("dca is defined for causal (decoder) attention only")
    q_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and window < kv_len:
        raise ValueError(
            f"dca computes full causal attention but this layer uses a sliding window of {window} tokens, shorter "
            f"than the {kv_len} keys: set config.sliding_window=None (and use_sliding_window=False for Qwen2)"
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        expected = torch.arange(kv_len - q_len, kv_len, device=position_ids.device)
        if position_ids.shape[-1] != q_len or not bool((position_ids == expected).all()):
            raise ValueError(
                "dca needs the queries to be the last tokens of one contiguous sequence whose keys are all present "
                f"(positions {kv_len - q_len}..{kv_len - 1}), got other position_ids. Not supported: sequence-parallel "
                "shards (dca does not compose with ring/zigzag/Ulysses methods), packed sequences, left padding, and "
                "static or sliding-window KV caches (use the default DynamicCache)"
            )
    if rotary is None:
        raise RuntimeError("the model patched with dca has been deleted")
    inv_freq = rotary.inv_freq
    k_dca = None
    if reuse:
        _hook(module)  # normally done when patching; a family-name patch hooks each layer at its first call
        k_dca = _rotated_keys(module, key, inv_freq, config)
    out, _ = dual_chunk_attention(query, key, value, inv_freq, config, scale=scaling, k_dca=k_dca)
    return out.transpose(1, 2).contiguous(), None


# Mask function: DCA knows causality itself, so no ``S x S`` mask is built; padding masks are refused.
_dca_mask = padding_mask_refuser("dca", "run one unpadded sequence per batch row (or pad at the end and ignore "
                                 "those positions)")


def dca_hf_attention(model=None, *, pretraining_length: Optional[int] = None, chunk_size: Optional[int] = None,
                     local_window: Optional[int] = None, cache_rotated_keys: bool = True):
    """``Method.hf_attention`` factory: ``(attention_fn, mask_fn)`` for transformers.

    With a model instance, the options are resolved now (``pretraining_length`` defaults to the config's
    ``original_max_position_embeddings`` or ``max_position_embeddings``) and bound to that model's modules and rotary
    embedding. With ``None`` (a family-name patch) they are resolved per call from each attention module's config.
    ``cache_rotated_keys=False`` re-rotates every cached key at every decoding step instead of keeping the rotated
    keys (same results, about the cost of the attention itself per step; see the module docstring).
    """
    options = {"pretraining_length": pretraining_length, "chunk_size": chunk_size, "local_window": local_window,
               "cache_rotated_keys": bool(cache_rotated_keys)}
    if model is not None:
        length = pretraining_length or _default_pretraining_length(model.config)
        config = DCAConfig.create(length, chunk_size, local_window)
        rotary = _find_rotary(model)
        _check_rope_type(str(getattr(rotary, "rope_type", _rope_type(text_config(model.config)))))
        state = _ModelState(config, weakref.ref(rotary), bool(cache_rotated_keys))
        for module in model.modules():
            _MODEL_STATES[module] = state
            if cache_rotated_keys and isinstance(getattr(module, "layer_idx", None), int) \
                    and type(module).__name__.endswith("Attention"):
                _hook(module)
    elif pretraining_length is not None:
        DCAConfig.create(pretraining_length, chunk_size, local_window)  # validate now, not at the first forward

    def attention_fn(module, query, key, value, attention_mask, *args, **kwargs):
        return dca_attention_forward(options, module, query, key, value, attention_mask, *args, **kwargs)

    return attention_fn, _dca_mask


def _check(*, num_heads: int, num_kv_heads: int, world_size: int) -> None:
    if world_size > 1:
        raise ValueError(
            f"dca runs on one device and does not compose with sequence parallelism (world size {world_size}): use a "
            "ring method for training at long context, or run dca with a sequence-parallel group of size 1"
        )


register(
    Method(
        name="dca",
        description="Dual Chunk Attention (ChunkLlama): training-free context extension beyond the pretraining length",
        hf_attention=dca_hf_attention,
        causal_only=True,
        check=_check,
        communication="none (single device)",
        options={"pretraining_length": None, "chunk_size": "3/4 pretraining_length",
                 "local_window": "1/8 pretraining_length", "cache_rotated_keys": True},
    ),
    "chunkllama",
    "dual_chunk_attn",
)

