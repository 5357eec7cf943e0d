"""Per-rank peak memory of one training step of SmolLM2-135M (all 30 layers) at growing lengths on P gloo ranks.

Each measurement starts ``P`` fresh processes joined by gloo. Every process builds a Llama from SmolLM2-135M's
config (``assets/smollm2-135m/config.json``; random float32 weights, nothing is read but the config), switches its
attention to the sequence-parallel method (``apply_seq_parallel_monkey_patch``; the same method at P = 1), turns on
activation checkpointing (``--checkpointing``, default ``full``) and AdamW, and materialises the gradients and the
Adam state (one optimizer step on zero gradients) before anything is measured. It then shards one random sequence
with ``prepare_seq_parallel_inputs`` and runs one step, forward and backward, as train.py does, in three phases
whose peaks are read separately (splitting the backward at the final hidden states gives the same gradients and
allocates the same tensors as one ``backward`` call, plus one ``tokens × hidden`` gradient):

1. ``forward``: the decoder over the local tokens; what stays afterwards is the **checkpointed activations**
   (each layer's input, the final hidden states);
2. ``loss``: ``easy_context.chunked_cross_entropy_sum`` over the lm_head ``--loss-chunk-size`` tokens at a time,
   forward and backward (each chunk's logits recomputed in backward), then the token-weighted global mean: the
   **loss** term is the peak of this phase above its start;
3. ``backward``: the decoder's backward, which recomputes one layer at a time: the peak above the phase's start is
   **one layer's recompute working set** (gradients of that layer's inputs included). Inside it, every call of the
   method's attention (forward, recompute and backward) is marked, and the largest rise inside one call is the
   **attention buffers** (the schedule's received K/V blocks, float32 dK/dV and accumulators, its outputs).

**How memory is measured.** Per process, the kernel's peak resident set (``VmHWM`` in ``/proc/self/status``), reset
with ``/proc/self/clear_refs`` at each phase boundary, so every phase has its own exact peak. The processes run with
``MALLOC_MMAP_THRESHOLD_=65536``: every allocation of 64 KiB or more (every tensor that matters) is its own ``mmap``
and goes back to the system when freed, so the resident set follows the live tensor bytes instead of keeping
freed heap. Every number is relative to the process's resident set before the model is built (the interpreter,
torch, transformers, gloo), so ``peak_bytes`` is what the step adds to a bare process: ``fixed_bytes`` (weights,
gradients and Adam state: 16 bytes per parameter in float32) plus what depends on the length.

**Compute is skipped, allocation is not.** On 2 cores a real 30-layer step at 32K tokens takes tens of minutes, so by
default (``--real-compute`` turns this off) a ``TorchDispatchMode`` replaces every functional ATen operation on a
floating tensor of at least 64K elements (matrix products, the fused attention kernels and their backward, norms,
activations, the loss's softmax) by zero-filled tensors of the shapes, strides and dtypes its meta kernel gives.
Views, in-place operations and the collectives (the ring's sends and receives) run as they are. The step therefore
creates the same tensors, of the same sizes, in the same order, freed at the same points, as the real step; only
their values differ. Not counted: the kernels' own scratch (``O(block²)`` per thread in the attention kernel).
``--real-compute`` at a small length checks this (docs/benchmarks.md gives the figures).

**Memory options.** ``--tiled-mlp [N]`` (each MLP over sequence tiles of N tokens, default the hidden size:
:mod:`easy_context.tiling`) and ``--offload-checkpoints`` (the checkpointed layer inputs in host memory:
:mod:`easy_context.offload`) turn on train.py's options of the same names in every process; ``--also-without``
measures every point without them as well. Each row records them (``tiled_mlp``: the tile in tokens, or null;
``offload_checkpoints``) and the tables group the rows by them. On CPU the offload moves nothing (the layer inputs
already are in host memory), so its rows measure the same as those without it.

The script prints, per P, the fitted bytes per token per rank (least squares of ``peak − fixed`` against the global
length) and the longest global length under ``--cap-gib`` per rank (from the planner's CPU mode, which predicts
these measurements within a few percent), then ``peak − fixed`` at P relative to P = 1 at the largest length measured
at every P. ``--json PATH`` writes one row per measurement (``ranks``, ``seq_len``, ``peak_bytes`` = the
largest over ranks, ``fixed_bytes``, and the breakdown); ``--output-dir`` gets ``memory_scaling.md`` and
``memory_scaling.png``.

    python benchmarks/memory_scaling.py --quick --json benchmarks/results/memory_scaling.json
    python benchmarks/memory_scaling.py --ranks 1 2 4 --lengths 8192 16384 32768 65536
    python benchmarks/memory_scaling.py --ranks 1 --lengths 32768 --tiled-mlp --also-without
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import proc_status, run_on_ranks  # noqa: E402
from easy_context import cli  # noqa: E402
from easy_context.cli import float_range, int_range  # noqa: E402
from easy_context.training.model import tile_size_arg  # noqa: E402

CONFIG = ROOT / "assets" / "smollm2-135m" / "config.json"
QUICK_LENGTHS = [8192, 16384, 32768]
FULL_LENGTHS = [8192, 16384, 32768, 65536]


# ------------------------------------------------------------------------------------------------------------------
# Allocated bytes per phase, from the allocator's events
# ------------------------------------------------------------------------------------------------------------------

class PhasePeaks:
    """Nested, repeated phases (``enter``/``leave`` by label) timed against the allocator's events.

    :meth:`analyse` takes the profiler's ``[memory]`` events (every allocation and free of torch's CPU allocator,
    with its size and time), sums them into the live bytes over time, and returns, per label, the largest rise of
    live bytes above the start of one instance of the phase, with the largest live bytes overall.
    """

    def __init__(self):
        self.stack = []
        self.spans = []  # (label, start_ns, end_ns)
        self.marks = {}

    def enter(self, label: str) -> None:
        self.stack.append((label, time.time_ns()))

    def leave(self, label: str) -> None:
        top, start = self.stack.pop()
        assert top == label, (label, top)
        self.spans.append((label, start, time.time_ns()))

    def mark(self, name: str) -> None:
        self.marks[name] = time.time_ns()

    @staticmethod
    def live_curve(prof):
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        times, live, total = [], [], 0
        for t, n in events:
            total += n
            times.append(t)
            live.append(total)
        return times, live

    def analyse(self, prof) -> dict:
        import bisect

        times, live = self.live_curve(prof)

        def at(t):  # live bytes just before time t
            k = bisect.bisect_left(times, t)
            return live[k - 1] if k else 0

        def peak(t0, t1):
            lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
            return max([at(t0)] + live[lo:hi])

        rise = {}
        for label, t0, t1 in self.spans:
            rise[label] = max(rise.get(label, 0), peak(t0, t1) - at(t0))
        out = {"rise": rise, "peak": max(live, default=0), "marks": {k: at(t) for k, t in self.marks.items()}}
        return out


class _Mark(torch.autograd.Function):
    """Identity whose backward enters or leaves a phase (marks the attention's backward)."""

    @staticmethod
    def forward(ctx, tracker, action, label, *xs):
        ctx.tracker, ctx.action, ctx.label = tracker, action, label
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        getattr(ctx.tracker, ctx.action)(ctx.label)
        return (None, None, None) + grads


# ------------------------------------------------------------------------------------------------------------------
# Skipping the arithmetic of matrix products and attention, keeping their allocations
# ------------------------------------------------------------------------------------------------------------------

SKIP_MIN_ELEMENTS = 1 << 16


def _skip_compute_mode():
    """A dispatch mode that allocates the outputs of functional float operations without computing them."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten, tree_map

    def to_meta(x):
        if isinstance(x, torch.Tensor):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        return x

    def from_meta(x):
        if isinstance(x, torch.Tensor):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).zero_()
        return x

    def skippable(func, args, kwargs) -> bool:
        if func.namespace != "aten" or func.is_view or func._schema.is_mutable:
            return False  # collectives, views (aliases) and in-place or out= operations run as they are
        flat, _ = tree_flatten((args, kwargs))
        return any(isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() >= SKIP_MIN_ELEMENTS
                   for x in flat)

    class SkipCompute(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if skippable(func, args, kwargs):
                try:
                    out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
                except (NotImplementedError, RuntimeError):  # no meta kernel, or a data-dependent shape
                    return func(*args, **kwargs)
                flat, _ = tree_flatten(out)
                if all(not isinstance(x, torch.Tensor) or x.device.type == "meta" for x in flat):
                    return tree_map(from_meta, out)
            return func(*args, **kwargs)

    return SkipCompute()


# ------------------------------------------------------------------------------------------------------------------
# One rank's measurement
# ------------------------------------------------------------------------------------------------------------------

def measure_rank(rank: int, world: int, seq_len: int, opts: dict) -> dict:
    import contextlib

    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from easy_context import apply_seq_parallel_monkey_patch, chunked_cross_entropy_sum, prepare_seq_parallel_inputs
    from easy_context.loss import resolve_loss_chunk_size, token_weighted_loss
    from easy_context.tiling import resolve_tile_size
    from easy_context.training.model import enable_checkpointing

    torch.set_num_threads(1)
    base = proc_status("VmRSS")
    config = LlamaConfig.from_json_file(str(CONFIG))
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
    config.use_cache = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.train()
    name = apply_seq_parallel_monkey_patch(opts["method"], model)
    enable_checkpointing(model, opts["checkpointing"], tiled_mlp=opts.get("tiled_mlp"),
                         offload=opts.get("offload_checkpoints", False))
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam state exists from here on, as in every step after the first
    state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    fixed = sum(t.untyped_storage().nbytes() for t in params + [p.grad for p in params] + state)
    tracker = PhasePeaks()

    inner = ALL_ATTENTION_FUNCTIONS[name]

    def marked_attention(module, query, key, value, *args, **kwargs):
        tracker.enter("attention")
        query, key, value = _Mark.apply(tracker, "leave", "attention", query, key, value)
        out, extra = inner(module, query, key, value, *args, **kwargs)
        tracker.leave("attention")
        (out,) = _Mark.apply(tracker, "enter", "attention", out)
        return out, extra

    AttentionInterface.register(name, marked_attention)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (1, seq_len + 1), generator=g)
    local = prepare_seq_parallel_inputs(opts["method"], tokens[:, :-1], torch.arange(seq_len)[None],
                                        tokens[:, 1:].clone(), rank, world, "cpu")
    local_tokens = local["local_input_ids"].shape[1]
    chunk = resolve_loss_chunk_size(opts["loss_chunk_size"], local_tokens, hidden_size=config.hidden_size,
                                    intermediate_size=config.intermediate_size, vocab_size=config.vocab_size)
    mode = contextlib.nullcontext() if opts["real_compute"] else _skip_compute_mode()
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, mode:
        tracker.enter("forward")
        hidden = model.model(input_ids=local["local_input_ids"], position_ids=local["local_position_ids"],
                             use_cache=False)[0]
        tracker.leave("forward")
        tracker.mark("after_forward")
        tracker.enter("loss")
        h = hidden.detach().requires_grad_()
        loss_sum, count = chunked_cross_entropy_sum(h, model.lm_head.weight, local["local_target_ids"],
                                                    chunk_size=chunk)
        loss = token_weighted_loss(loss_sum, count)
        loss.backward()
        tracker.leave("loss")
        tracker.enter("backward")
        hidden.backward(h.grad)
        del hidden, h
        tracker.leave("backward")
    seconds = time.perf_counter() - t0
    found = tracker.analyse(prof)
    rise = found["rise"]
    tile = resolve_tile_size(opts["tiled_mlp"], config.hidden_size) if opts.get("tiled_mlp") else None
    return {"rank": rank, "local_tokens": local_tokens, "params": n_params, "loss_chunk_size": chunk,
            "tiled_mlp": tile,
            "base_rss": base, "rss_peak_bytes": proc_status("VmHWM") - base, "fixed_bytes": fixed,
            "peak_bytes": fixed + found["peak"], "checkpointed_bytes": found["marks"]["after_forward"],
            "forward_rise": rise.get("forward", 0),
            "loss_bytes": rise.get("loss", 0), "recompute_bytes": rise.get("backward", 0),
            "attention_bytes": rise.get("attention", 0), "seconds": seconds}


def run_measurement(world: int, seq_len: int, opts: dict, timeout: float = 3600) -> list:
    """Every rank's measurement, from ``world`` fresh processes."""
    # Allocations of 1 MiB and more go straight back to the system when freed, so the resident set of each rank
    # stays near its allocated bytes (4 ranks at 32K tokens share a 24 GB machine); the measurement does not read it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    return run_on_ranks(measure_rank, world, seq_len, opts, timeout=timeout, what=f"P={world}, {seq_len} tokens")


def summarise(world: int, seq_len: int, ranks: list, opts: dict) -> dict:
    worst = max(ranks, key=lambda r: r["peak_bytes"])
    row = {"ranks": world, "seq_len": seq_len, "method": opts["method"], "checkpointing": opts["checkpointing"],
           "loss_chunk_size": worst["loss_chunk_size"], "local_tokens": worst["local_tokens"],
           "params": worst["params"], "real_compute": opts["real_compute"], "tiled_mlp": worst["tiled_mlp"],
           "offload_checkpoints": bool(opts.get("offload_checkpoints")),
           "peak_bytes": worst["peak_bytes"], "fixed_bytes": max(r["fixed_bytes"] for r in ranks)}
    for key in ("checkpointed_bytes", "recompute_bytes", "attention_bytes", "loss_bytes", "forward_rise"):
        row[key] = max(r[key] for r in ranks)
    row["seconds"] = max(r["seconds"] for r in ranks)
    return row


# ------------------------------------------------------------------------------------------------------------------
# Fits, table, plot
# ------------------------------------------------------------------------------------------------------------------

def fit(rows: list) -> tuple:
    """Least squares ``peak − fixed = a + b · seq_len`` over one P's rows: ``(a, b)``."""
    xs = [r["seq_len"] for r in rows]
    ys = [r["peak_bytes"] - r["fixed_bytes"] for r in rows]
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def planned_longest(method: str, ranks: int, cap_gib: float, checkpointing: str, loss_chunk, tiled_mlp=None,
                    offload_checkpoints: bool = False) -> int:
    """The longest global length whose per-rank peak stays under ``cap_gib``, from the planner's CPU mode (checked
    against these measurements): a straight-line fit over lengths where the loss and then the layers set the peak
    would extrapolate the wrong slope."""
    from easy_context.plan import PRESETS, Plan, max_seq_length

    plan = Plan(PRESETS["smollm2-135m"], gpus=ranks, gpu_memory_gb=cap_gib * GIB / 1e9, method=method, cpu=True,
                checkpointing=checkpointing, loss_chunk_size=loss_chunk, tiled_mlp=tiled_mlp,
                offload_checkpoints=offload_checkpoints)
    return max_seq_length(plan)


def options_label(row: dict) -> str:
    """The memory options a row was measured with: ``tiled MLP <tile>``, ``offload``, or ``none``."""
    parts = ([f"tiled MLP {row['tiled_mlp']}"] if row.get("tiled_mlp") else []) + \
        (["offload"] if row.get("offload_checkpoints") else [])
    return ", ".join(parts) or "none"


GIB = 2 ** 30


def report(rows: list, cap_gib: float) -> str:
    lines = ["| method | options | P | tokens | local tokens | loss chunk | peak (GiB) | fixed | peak − fixed | "
             "checkpointed | layer recompute | attention | loss | s |", "|" + " --- |" * 14]
    for r in sorted(rows, key=lambda r: (r["method"], options_label(r), r["ranks"], r["seq_len"])):
        lines.append(
            f"| {r['method']} | {options_label(r)} | {r['ranks']} | {r['seq_len']} | {r['local_tokens']} | "
            f"{r['loss_chunk_size']} | "
            f"{r['peak_bytes'] / GIB:.2f} | {r['fixed_bytes'] / GIB:.2f} | "
            f"{(r['peak_bytes'] - r['fixed_bytes']) / GIB:.2f} | {r['checkpointed_bytes'] / GIB:.2f} | "
            f"{r['recompute_bytes'] / GIB:.2f} | {r['attention_bytes'] / GIB:.3f} | {r['loss_bytes'] / GIB:.2f} | "
            f"{r['seconds']:.0f} |")
    lines += ["", f"| method | options | P | bytes per token per rank (fit) | intercept (GiB) | longest length "
              f"under {cap_gib:g} GiB per rank (planner, CPU mode) |", "| --- | --- | --- | --- | --- | --- |"]
    loss_chunk = "auto" if len({r["loss_chunk_size"] for r in rows}) > 1 else rows[0]["loss_chunk_size"]
    notes = []
    for method, label in sorted({(r["method"], options_label(r)) for r in rows}):
        mrows = [r for r in rows if r["method"] == method and options_label(r) == label]
        worlds = sorted({r["ranks"] for r in mrows})
        longest = {}
        for p in worlds:
            sub = [r for r in mrows if r["ranks"] == p]
            a, b = fit(sub)
            longest[p] = planned_longest(method, p, cap_gib, sub[0]["checkpointing"], loss_chunk,
                                         sub[0].get("tiled_mlp"), bool(sub[0].get("offload_checkpoints")))
            lines.append(f"| {method} | {label} | {p} | {b:,.0f} | {a / GIB:.2f} | {longest[p]:,} |")
        common = set.intersection(*({r["seq_len"] for r in mrows if r["ranks"] == p} for p in worlds))
        if common and 1 in worlds and len(worlds) > 1:
            s = max(common)
            var = {r["ranks"]: r["peak_bytes"] - r["fixed_bytes"] for r in mrows if r["seq_len"] == s}
            notes.append(f"{method} ({label}) at {s} tokens: peak − fixed relative to P = 1: " + ", ".join(
                f"P={p}: {var[p] / var[1]:.2f}" for p in worlds if p != 1)
                + "; longest length under the cap relative to P = 1: " + ", ".join(
                f"P={p}: {longest[p] / max(longest[1], 1):.2f}" for p in worlds if p != 1) + ".")
    return "\n".join(lines + [""] + notes)


def plot(rows: list, path: Path, cap_gib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, label, p in sorted({(r["method"], options_label(r), r["ranks"]) for r in rows}):
        sub = sorted((r for r in rows if r["ranks"] == p and r["method"] == method and options_label(r) == label),
                     key=lambda r: r["seq_len"])
        xs = [r["seq_len"] for r in sub]
        name = f"{method} P={p}" if len({r["method"] for r in rows}) > 1 else f"P={p}"
        name += f" ({label})" if len({options_label(r) for r in rows}) > 1 else ""
        ax.plot(xs, [r["peak_bytes"] / GIB for r in sub], "o-", label=f"{name}: peak")
        ax.plot(xs, [(r["peak_bytes"] - r["fixed_bytes"]) / GIB for r in sub], "x--", label=f"{name}: peak − fixed")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, whole sequence)")
    ax.set_ylabel("per-rank memory (GiB)")
    ax.set_title("SmolLM2-135M (30 layers), one training step, per rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int_range(1, 8), nargs="+", default=[1, 2, 4], help="gloo ranks P")
    parser.add_argument("--lengths", type=int_range(64), nargs="+", default=None,
                        help=f"global sequence lengths (default {FULL_LENGTHS}; --quick: {QUICK_LENGTHS})")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}")
    parser.add_argument("--methods", nargs="+", default=["zigzag_ring_attn"], help="sequence-parallel methods")
    parser.add_argument("--checkpointing", choices=["full", "remat", "none"], default="full")
    parser.add_argument("--loss-chunk-size", default="auto",
                        help="tokens per lm_head + loss chunk, or 'auto' (easy_context.loss.auto_loss_chunk_size)")
    parser.add_argument("--cap-gib", type=float_range(0, lo_open=True), default=8.0,
                        help="per-rank memory cap for the longest-length column")
    parser.add_argument("--tiled-mlp", nargs="?", const="auto", type=tile_size_arg, metavar="N",
                        help="each MLP over sequence tiles of N tokens (alone: the hidden size), easy_context.tiling")
    parser.add_argument("--offload-checkpoints", action="store_true",
                        help="checkpointed layer inputs in host memory (easy_context.offload; on CPU nothing moves)")
    parser.add_argument("--also-without", action="store_true",
                        help="measure every point also without --tiled-mlp / --offload-checkpoints")
    parser.add_argument("--real-compute", action="store_true", help="run the matrix products and attention too")
    parser.add_argument("--json", type=Path, default=None, help="write one row per measurement here")
    parser.add_argument("--output-dir", "--out", type=Path, default=None, metavar="DIR",
                        help="write memory_scaling.md and memory_scaling.png here")
    args = parser.parse_args()
    if args.loss_chunk_size != "auto" and not args.loss_chunk_size.isdigit():
        parser.error(f"--loss-chunk-size: {args.loss_chunk_size!r} is neither a positive integer nor 'auto'")
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    rows = []
    t0 = time.perf_counter()
    if args.offload_checkpoints and args.checkpointing == "none":
        parser.error("--offload-checkpoints needs --checkpointing full or remat")
    variants = [(args.tiled_mlp, args.offload_checkpoints)]
    if args.also_without and variants[0] != (None, False):
        variants.insert(0, (None, False))
    points = [(m, v, w, s) for m in args.methods for v in variants for w in args.ranks for s in lengths]
    for method, (tiled_mlp, offload), world, seq_len in points:
        opts = {"method": method, "checkpointing": args.checkpointing, "real_compute": args.real_compute,
                "loss_chunk_size": (args.loss_chunk_size if args.loss_chunk_size == "auto"
                                    else int(args.loss_chunk_size)),
                "tiled_mlp": tiled_mlp, "offload_checkpoints": offload}
        row = summarise(world, seq_len, run_measurement(world, seq_len, opts), opts)
        rows.append(row)
        print(f"{method} ({options_label(row)}) P={world} S={seq_len}: peak {row['peak_bytes'] / GIB:.2f} GiB, "
              f"fixed {row['fixed_bytes'] / GIB:.2f}"
              f", checkpointed {row['checkpointed_bytes'] / GIB:.2f}, recompute {row['recompute_bytes'] / GIB:.2f}"
              f", attention {row['attention_bytes'] / GIB:.3f}, loss {row['loss_bytes'] / GIB:.2f} "
              f"({row['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    table = report(rows, args.cap_gib)
    print(table)
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/memory_scaling.py " + " ".join(sys.argv[1:])
        (args.output_dir / "memory_scaling.md").write_text(f"```bash\n{command}\n```\n\n{table}\n")
        plot(rows, args.output_dir / "memory_scaling.png", args.cap_gib)


if __name__ == "__main__":
    main()
