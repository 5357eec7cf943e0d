"""Capacity planner: per-GPU memory of one training step of a causal LM, and the longest sequence that fits.

``python -m easy_context.plan --model llama-2-7b --gpus 8 --gpu-memory 80 --method zigzag_ring_attn --zero 3
--offload-optimizer --offload-params`` prints the per-GPU breakdown at ``--seq-length`` (or at the longest length
that fits) and that longest length. ``--json`` prints one object instead. ``--cpu`` models the CPU runs of
``benchmarks/memory_scaling.py`` (float32 weights, torch's AdamW, no GPU allocator), which the planner is checked
against (``tests/test_plan.py``).

The model of memory (docs/capacity.md has it with figures). ``N`` parameters, ``b`` bytes per element of the
training dtype, ``G`` GPUs (the ZeRO partitions), ``P`` the sequence-parallel size, ``s = batch × S / P`` tokens
per GPU, a model of ``L`` layers, hidden size ``E``, MLP size ``F``, ``H``/``H_kv`` query/key-value heads of size
``D`` and vocabulary ``V``. A step's peak is reached either while the loss is computed or while one layer is
recomputed in backward, never both, so

    peak = fixed + checkpointed + max(loss, layer recompute) [+ reserve on a GPU]

* **fixed** (does not depend on the length):
  - weights: ``b·N``; ``/G`` with ZeRO-3; with ``--offload-params`` only what ZeRO-3 gathers at once stays (the
    ``stage3_max_live_parameters`` window, two decoder layers here) plus the embedding and the head;
  - gradients: ``b·N``; ``/G`` with ZeRO ≥ 2; nothing with ``--offload-optimizer`` (the partitions go to the host)
    but one layer's gradients before their reduce-scatter;
  - optimizer: Adam's two moments, and on a GPU a float32 master copy of the weights (``12·N`` in mixed precision,
    ``8·N`` for float32 training); ``/G`` with ZeRO ≥ 1; nothing with ``--offload-optimizer``.
  On CPU (float32, no ZeRO) that is ``16·N``.
* **checkpointed activations**, per token: ``--checkpointing full`` keeps each layer's input, ``L·E·b``, plus the
  final hidden states, their norm and the embedding output (``3·E·b``) and the RoPE cos/sin (``2·D·4``);
  ``remat`` adds each layer's attention output and its log-sum-exp (``L·(H·D·b + H·4)``); ``none`` keeps every
  layer's whole working set (``L`` × the layer term below; with ``--tiled-mlp`` without its MLP-sized rows).
  ``--offload-checkpoints`` moves the ``L·E·b`` layer inputs to host memory (``host_offload``, not counted in the
  peak) and brings one back for the layer being recomputed (``E·b`` more in the layer term); with ``--cpu`` it
  changes nothing, the inputs already being in host memory.
* **one layer's recompute working set**, per token: what one decoder layer holds while it is recomputed and
  differentiated, ``b·(C_E·E + C_F·F)`` (norm outputs, q/k/v before and after RoPE, attention output, residuals:
  ``C_E`` hidden-sized rows; gate, up, SiLU, product and their gradients: ``C_F`` MLP-sized rows, over one tile of
  ``--tiled-mlp`` tokens instead of every local token with the tiled MLP: ``mlp_intermediate``), or the attention
  phase, ``C_ATTN_E`` hidden-sized rows plus the attention buffers of the method: ring, zigzag, stripe and
  dist_flash_attn hold the received and the next K/V block (``4·H_kv·D·b``) and float32 accumulators for the
  output, dQ and the travelling dK/dV
  (``(2·H·D + 4·H_kv·D)·4``); Ulysses holds its all-to-all copies of q, k, v and the output over the whole
  sequence for ``H/U`` heads (``2·(2·H·D + 2·max(H_kv, U)·D)·b``); data_parallel holds the kernel's output and LSE.
  The constants ``C_E``, ``C_F`` and the attention terms are the ones ``benchmarks/memory_scaling.py`` measures on
  SmolLM2-135M (the stored rows are in ``benchmarks/results/memory_scaling.json``).
* **loss**: with ``c`` the chunk (``--loss-chunk-size`` tokens; ``auto``:
  :func:`easy_context.loss.auto_loss_chunk_size`; ``full``: every local token at once, as a plain ``model(...).logits``
  loss) and ``R = c·V·4`` one float32 row per chunk token, ``max(3·R + V·E·b, R + 2·V·E·b) + c·V·b (16-bit dtypes only)
  + 2·s·E·b``: the recomputed logits' log-softmax, the loss gradient and the logits' gradient; the head's weight
  gradient and the buffer it is accumulated into; the head's 16-bit output; the hidden states' gradient.
* **reserve** (GPU only): the CUDA context, NCCL's buffers and the caching allocator's fragmentation, taken as
  ``GPU_RESERVE_FIXED`` bytes plus ``GPU_RESERVE_FRACTION`` of the GPU.

The longest trainable sequence is the largest ``S`` (a multiple of the method's layout multiple, ``2P`` for zigzag)
whose peak fits in ``--gpu-memory``; the peak grows with ``S``, so it is found by bisection.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from .cli import Parser, float_range, int_range
from .loss import resolve_loss_chunk_size
from .tiling import resolve_tile_size

__all__ = ["ModelShape", "PRESETS", "load_shape", "Plan", "breakdown", "max_seq_length", "main"]

GB = 10 ** 9
GIB = 2 ** 30

# One layer's recompute working set, in rows of E and F elements per token (measured on SmolLM2-135M): the MLP
# phase, and the hidden-sized rows still alive while the attention runs.
C_E = 8.0
C_F = 6.0
C_ATTN_E = 4.0
# GPU reserve: CUDA context + NCCL + allocator fragmentation.
GPU_RESERVE_FIXED = 3 * GIB
GPU_RESERVE_FRACTION = 0.05

METHODS = ("zigzag_ring_attn", "ring_attn", "stripe_attn", "dist_flash_attn", "ulysses_attn", "usp_attn",
           "data_parallel")
RING_METHODS = ("zigzag_ring_attn", "ring_attn", "stripe_attn", "dist_flash_attn")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide a decoder-only transformer's memory."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: Optional[int] = None
    tie_word_embeddings: bool = False

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_parameters(self) -> int:
        e, f, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.d
        h, hkv = self.num_attention_heads, self.num_key_value_heads
        layer = e * h * d + 2 * e * hkv * d + h * d * e + 3 * e * f + 2 * e
        return v * e * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + e

    @property
    def layer_parameters(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.d
        return e * self.num_attention_heads * d + 2 * e * self.num_key_value_heads * d + \
            self.num_attention_heads * d * e + 3 * e * f + 2 * e


# Published shapes (the models' config.json files on the Hugging Face hub and their papers).
PRESETS: Dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(4096, 32, 32, 32, 11008, 32000),
    "llama-2-13b": ModelShape(5120, 40, 40, 40, 13824, 32000),
    "llama-2-70b": ModelShape(8192, 80, 64, 8, 28672, 32000),
    "llama-3-8b": ModelShape(4096, 32, 32, 8, 14336, 128256),
    "llama-3-70b": ModelShape(8192, 80, 64, 8, 28672, 128256),
    "mistral-7b": ModelShape(4096, 32, 32, 8, 14336, 32000),
    "smollm2-135m": ModelShape(576, 30, 9, 3, 1536, 49152, head_dim=64, tie_word_embeddings=True),
}


class PlanError(ValueError):
    """A bad input, reported as one line."""


def load_shape(spec: str) -> ModelShape:
    """A preset name, a ``config.json`` path or a folder holding one."""
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or a "
                        f"folder holding one")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PlanError(f"cannot read {path}: {err}") from None
    cfg = cfg.get("text_config", cfg)
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(hidden_size=int(cfg["hidden_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
                          num_attention_heads=heads,
                          num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                          intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                          head_dim=cfg.get("head_dim"), tie_word_embeddings=bool(cfg.get("tie_word_embeddings")))
    except (KeyError, TypeError, ValueError) as err:
        raise PlanError(f"{path} lacks the shape of a decoder-only transformer ({err})") from None


@dataclass
class Plan:
    """A training setup: the model and everything but the sequence length."""

    shape: ModelShape
    gpus: int = 8
    gpu_memory_gb: float = 80.0
    method: str = "zigzag_ring_attn"
    sp_size: Optional[int] = None
    zero: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpointing: str = "full"
    loss_chunk_size: object = 4096  # an int, "auto" or "full"
    dtype: str = "bfloat16"
    batch_size: int = 1
    cpu: bool = False
    tiled_mlp: object = None  # None (off), "auto" (tiles of hidden_size tokens) or a tile size in tokens
    offload_checkpoints: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise PlanError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.checkpointing not in ("full", "remat", "none"):
            raise PlanError(f"unknown checkpointing {self.checkpointing!r}: choose full, remat or none")
        if self.tiled_mlp is not None:
            try:
                self.tiled_mlp = resolve_tile_size(self.tiled_mlp, self.shape.hidden_size)
            except ValueError as err:
                raise PlanError(str(err)) from None
        if self.offload_checkpoints and self.checkpointing == "none":
            raise PlanError("--offload-checkpoints needs --checkpointing full or remat")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
        if self.sp_size is None:
            self.sp_size = 1 if self.method == "data_parallel" else self.gpus
        if self.gpus % self.sp_size:
            raise PlanError(f"--sp-size {self.sp_size} does not divide --gpus {self.gpus}")
        if self.method == "data_parallel" and self.sp_size != 1:
            raise PlanError("data_parallel has no sequence parallelism: --sp-size must be 1")
        h = self.shape.num_attention_heads
        if self.method == "ulysses_attn" and h % self.sp_size:
            raise PlanError(f"ulysses_attn needs the {h} heads to divide by --sp-size {self.sp_size}; "
                            f"use usp_attn or zigzag_ring_attn")
        if self.cpu:
            self.dtype, self.zero, self.offload_optimizer, self.offload_params = "float32", 0, False, False

    @property
    def b(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def multiple(self) -> int:
        return 2 * self.sp_size if self.method in ("zigzag_ring_attn", "usp_attn") else self.sp_size

    @property
    def ulysses_degree(self) -> int:
        if self.method == "ulysses_attn":
            return self.sp_size
        if self.method == "usp_attn":
            return math.gcd(self.sp_size, self.shape.num_attention_heads)
        return 1


def _fixed(plan: Plan) -> Dict[str, float]:
    m, n, b, g = plan.shape, plan.shape.num_parameters, plan.b, plan.gpus
    embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    if plan.offload_params and plan.zero == 3:
        weights = b * (2 * m.layer_parameters + embed)
    else:
        weights = b * n / (g if plan.zero == 3 else 1)
    if plan.offload_optimizer:
        grads = b * m.layer_parameters
        optimizer = 0.0
    else:
        grads = b * n / (g if plan.zero >= 2 else 1)
        optimizer = (8 if b == 4 else 12) * n / (g if plan.zero >= 1 else 1)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def _attention_per_token(plan: Plan) -> float:
    """Bytes per local token that one call of the method's attention adds (outputs included)."""
    m, b = plan.shape, plan.b
    hd, hkvd = m.num_attention_heads * m.d, m.num_key_value_heads * m.d
    outputs = b * (2 * hd + 2 * hkvd)  # out in forward; dq, dk, dv in backward
    if plan.method in RING_METHODS or (plan.method == "usp_attn" and plan.ulysses_degree < plan.sp_size):
        return outputs + 4 * hkvd * b + (2 * hd + 4 * hkvd) * 4
    if plan.method in ("ulysses_attn", "usp_attn"):
        u = plan.ulysses_degree
        return outputs + 2 * (2 * hd + 2 * max(m.num_key_value_heads, u) * m.d) * b
    return outputs + m.num_attention_heads * 4


def loss_chunk(plan: Plan, local_tokens: int) -> int:
    if plan.loss_chunk_size == "full":
        return local_tokens
    m = plan.shape
    return min(local_tokens, resolve_loss_chunk_size(plan.loss_chunk_size, local_tokens, hidden_size=m.hidden_size,
                                                     intermediate_size=m.intermediate_size, vocab_size=m.vocab_size,
                                                     dtype_bytes=plan.b))


def breakdown(plan: Plan, seq_length: int) -> Dict[str, float]:
    """Bytes per GPU at ``seq_length`` tokens per sequence, term by term, and their ``total``."""
    m, b = plan.shape, plan.b
    s = plan.batch_size * seq_length / plan.sp_size
    out = _fixed(plan)
    fixed = sum(out.values())
    # The MLP phase: hidden-sized rows over every local token, and MLP-sized rows over every local token, or over
    # one tile with the tiled MLP (easy_context.tiling: the intermediate is recomputed tile by tile in backward).
    mlp_rows = min(s, plan.tiled_mlp) if plan.tiled_mlp else s
    mlp_intermediate = mlp_rows * b * C_F * m.intermediate_size
    mlp_phase = s * b * C_E * m.hidden_size + mlp_intermediate
    attention = s * _attention_per_token(plan)
    layer_inputs = s * m.num_hidden_layers * m.hidden_size * b
    checkpointed = s * (3 * m.hidden_size * b + 2 * m.d * 4) + layer_inputs
    if plan.checkpointing == "remat":
        checkpointed += s * m.num_hidden_layers * (m.num_attention_heads * m.d * b + m.num_attention_heads * 4)
    elif plan.checkpointing == "none":  # every layer keeps its working set; a tiled MLP keeps only its input
        kept = 0 if plan.tiled_mlp else mlp_intermediate
        checkpointed += m.num_hidden_layers * (s * b * C_E * m.hidden_size + kept)
    host_offload = 0.0
    recompute_input = 0.0
    if plan.offload_checkpoints and not plan.cpu:  # on a CPU run the layer inputs already are in host memory
        host_offload, checkpointed = layer_inputs, checkpointed - layer_inputs
        recompute_input = s * m.hidden_size * b  # the recomputed layer's input, copied back for its backward
    layer = max(mlp_phase, s * C_ATTN_E * m.hidden_size * b + attention) + recompute_input
    chunk = loss_chunk(plan, int(s))
    row = chunk * m.vocab_size * 4  # one float32 row of logits (or their log-softmax, or a gradient) per token
    head_grad = m.vocab_size * m.hidden_size * b
    loss = max(3 * row + head_grad, row + 2 * head_grad) + (chunk * m.vocab_size * b if b < 4 else 0) \
        + 2 * s * m.hidden_size * b
    reserve = 0.0 if plan.cpu else GPU_RESERVE_FIXED + GPU_RESERVE_FRACTION * plan.gpu_memory_gb * GB
    out.update(fixed=fixed, checkpointed=checkpointed, layer_recompute=layer, attention_buffers=attention,
               mlp_intermediate=mlp_intermediate, loss=loss, loss_chunk_size=chunk, reserve=reserve,
               host_offload=host_offload, mlp_tile=plan.tiled_mlp or 0)
    out["total"] = fixed + checkpointed + max(loss, layer) + reserve
    return out


def max_seq_length(plan: Plan) -> int:
    """The longest sequence (a multiple of the layout's multiple) whose per-GPU peak fits; 0 if none does."""
    cap = plan.gpu_memory_gb * GB
    q = plan.multiple
    if breakdown(plan, q)["total"] > cap:
        return 0
    lo, hi = 1, 2
    while breakdown(plan, hi * q)["total"] <= cap:
        lo, hi = hi, hi * 2
        if hi > 2 ** 40:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if breakdown(plan, mid * q)["total"] <= cap:
            lo = mid
        else:
            hi = mid
    return lo * q


TABLE_MODELS = ("llama-2-7b", "llama-3-8b", "llama-3-70b")
TABLE_GPUS = (8, 16, 64)
TABLE_METHODS = (("ring_attn, zigzag_ring_attn, stripe_attn, dist_flash_attn", "zigzag_ring_attn"),
                 ("ulysses_attn", "ulysses_attn"), ("usp_attn", "usp_attn"), ("data_parallel", "data_parallel"))


def capacity_table(**options) -> str:
    """Markdown: the longest sequence per model (rows) and method (columns) for ``TABLE_GPUS`` GPUs, with
    ``options`` (the other :class:`Plan` fields) the same everywhere."""
    lines = ["| model | GPUs | " + " | ".join(name for name, _ in TABLE_METHODS) + " |",
             "| --- | --- |" + " --- |" * len(TABLE_METHODS)]
    for model in TABLE_MODELS:
        for gpus in TABLE_GPUS:
            cells = []
            for _, method in TABLE_METHODS:
                try:
                    plan = Plan(PRESETS[model], gpus=gpus, method=method, **options)
                    cells.append(f"{max_seq_length(plan) / 1000:,.0f}K")
                except PlanError:
                    cells.append("not possible")
            lines.append(f"| {model} | {gpus} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _human(n: float) -> str:
    return f"{n / GB:8.2f} GB"


def main(argv=None) -> int:
    parser = Parser(prog="python -m easy_context.plan",
                    description="Per-GPU memory of a long-context training step and the longest sequence that fits.")
    parser.add_argument("--model", default=None,
                        help=f"a preset ({', '.join(PRESETS)}), a config.json or a model folder")
    parser.add_argument("--gpus", type=int_range(1), default=8, help="GPUs in all")
    parser.add_argument("--gpu-memory", type=float_range(0, lo_open=True), default=80.0, help="GB per GPU")
    parser.add_argument("--method", choices=METHODS, default="zigzag_ring_attn")
    parser.add_argument("--sp-size", type=int_range(1), default=None, help="sequence-parallel size (default: --gpus)")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=3, help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload-optimizer", action="store_true", help="optimizer state and step on the host")
    parser.add_argument("--offload-params", action="store_true", help="ZeRO-3 parameters on the host")
    parser.add_argument("--checkpointing", choices=["full", "remat", "none"], default="full")
    parser.add_argument("--tiled-mlp", nargs="?", const="auto", default=None, metavar="N",
                        help="each MLP over sequence tiles of N tokens (alone: the hidden size), as train.py "
                             "--tiled-mlp: the MLP's intermediate is held for one tile instead of every local token")
    parser.add_argument("--offload-checkpoints", action="store_true",
                        help="the checkpointed layer inputs in host memory, as train.py --offload-checkpoints "
                             "(no effect with --cpu, where they already are)")
    parser.add_argument("--loss-chunk-size", default="4096", help="tokens per loss chunk, 'auto' or 'full'")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--batch-size", type=int_range(1), default=1, help="sequences per replica")
    parser.add_argument("--seq-length", type=int_range(1), default=None, help="the breakdown at this length")
    parser.add_argument("--cpu", action="store_true",
                        help="model a CPU run (float32, torch AdamW, no ZeRO, no GPU allocator), as "
                             "benchmarks/memory_scaling.py measures")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--table", action="store_true",
                        help=f"print the longest sequence of {', '.join(TABLE_MODELS)} on {TABLE_GPUS} GPUs per "
                             "method (markdown), with the other options as given")
    args = parser.parse_args(argv)
    if args.model is None and not args.table:
        parser.error("the following arguments are required: --model (or --table)")
    chunk = args.loss_chunk_size
    if chunk not in ("auto", "full"):
        if not chunk.isdigit() or int(chunk) < 1:
            parser.error(f"argument --loss-chunk-size: expected a positive integer, 'auto' or 'full', got {chunk!r}")
        chunk = int(chunk)
    if args.offload_params and args.zero != 3:
        parser.error("argument --offload-params: needs --zero 3")
    tile = args.tiled_mlp
    if tile not in (None, "auto"):
        if not tile.isdigit() or int(tile) < 1:
            parser.error(f"argument --tiled-mlp: expected a positive integer (tokens per tile), or nothing for the "
                         f"hidden size, got {tile!r}")
        tile = int(tile)
    memory_options = dict(tiled_mlp=tile, offload_checkpoints=args.offload_checkpoints)
    if args.table:
        print(capacity_table(gpu_memory_gb=args.gpu_memory, zero=args.zero, offload_optimizer=args.offload_optimizer,
                             offload_params=args.offload_params, checkpointing=args.checkpointing,
                             loss_chunk_size=chunk, dtype=args.dtype, batch_size=args.batch_size,
                             **memory_options))
        return 0
    try:
        plan = Plan(load_shape(args.model), gpus=args.gpus, gpu_memory_gb=args.gpu_memory, method=args.method,
                    sp_size=args.sp_size, zero=args.zero, offload_optimizer=args.offload_optimizer,
                    offload_params=args.offload_params, checkpointing=args.checkpointing, loss_chunk_size=chunk,
                    dtype=args.dtype, batch_size=args.batch_size, cpu=args.cpu, **memory_options)
    except PlanError as err:
        parser.error(str(err))
    longest = max_seq_length(plan)
    at = args.seq_length or longest or plan.multiple
    parts = breakdown(plan, at)
    fits = parts["total"] <= plan.gpu_memory_gb * GB
    if args.json:
        print(json.dumps({"model": args.model, "parameters": plan.shape.num_parameters, "max_seq_length": longest,
                          "seq_length": at, "fits": fits, "breakdown_bytes": parts,
                          "plan": {k: v for k, v in asdict(plan).items() if k != "shape"}}))
        return 0
    print(f"{args.model}: {plan.shape.num_parameters / 1e9:.2f}B parameters; {plan.gpus} GPUs of "
          f"{plan.gpu_memory_gb:g} GB, {plan.method}, sp size {plan.sp_size}, ZeRO-{plan.zero}"
          f"{', optimizer offload' if plan.offload_optimizer else ''}"
          f"{', parameter offload' if plan.offload_params else ''}"
          f", checkpointing {plan.checkpointing}"
          f"{f', tiled MLP ({plan.tiled_mlp}-token tiles)' if plan.tiled_mlp else ''}"
          f"{', checkpoint offload' if plan.offload_checkpoints else ''}, {plan.dtype}{' (CPU)' if plan.cpu else ''}")
    print(f"per GPU at {at:,} tokens per sequence ({at * plan.batch_size // plan.sp_size:,} tokens per GPU):")
    for key in ("weights", "gradients", "optimizer", "checkpointed", "layer_recompute", "attention_buffers",
                "mlp_intermediate", "loss", "reserve", "host_offload"):
        if key == "host_offload" and not plan.offload_checkpoints:
            continue
        note = {"attention_buffers": "  (part of layer_recompute)",
                "mlp_intermediate": "  (part of layer_recompute" + (f", one {plan.tiled_mlp}-token tile)"
                                                                     if plan.tiled_mlp else ")"),
                "host_offload": "  (host memory, not on the GPU)",
                "loss": f"  (chunk of {parts['loss_chunk_size']:,} tokens)"}.get(key, "")
        print(f"  {key:18s}{_human(parts[key])}{note}")
    print(f"  {'peak':18s}{_human(parts['total'])}  = fixed + checkpointed + max(loss, layer_recompute) + reserve"
          f"{'' if fits else '  DOES NOT FIT'}")
    print(f"longest trainable sequence: {longest:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
