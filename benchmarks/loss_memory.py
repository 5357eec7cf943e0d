"""Peak memory of the language-model loss: full float32 logits vs the chunked lm_head + cross-entropy.

For each sequence length, one fresh process per variant measures the peak memory added by forward + backward of
the loss from the final hidden states (SmolLM2-135M's shapes by default: hidden 576, vocabulary 49152):

* ``full``: ``logits = hidden @ W.T`` in float32 for every token, then ``cross_entropy`` (what a plain
  ``model(...).logits`` loss does);
* ``chunked``: :func:`easy_context.chunked_cross_entropy_sum`, which keeps ``chunk`` tokens' logits at a time
  and recomputes them in backward (what train.py uses).

Both get the same inputs and must give the same loss and gradients. On CPU the peak is the process's peak
resident set (VmHWM, reset before the measurement); on CUDA it is the allocator's peak.

    python benchmarks/loss_memory.py --lengths 4096 8192 [--hidden 576 --vocab 49152 --loss-chunk-size 4096]

``--chunk`` is the older spelling of ``--loss-chunk-size`` (option names: docs/cli.md).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easy_context import cli  # noqa: E402
from easy_context.cli import int_range  # noqa: E402


def measure(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, device: str) -> dict:
    from easy_context import chunked_cross_entropy_sum
    from easy_context.training import PeakMemory

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        if variant == "full":
            loss = F.cross_entropy((h @ w.T).float(), targets, reduction="sum")
        else:
            loss, _ = chunked_cross_entropy_sum(h, w, targets, chunk_size=chunk)
        loss.backward()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "tokens": tokens, "peak_extra_mib": mem.extra / 2**20, "seconds": seconds,
            "loss": loss.item(), "grad_h_norm": h.grad.norm().item(), "grad_w_norm": w.grad.norm().item()}


def main() -> None:
    parser = cli.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int_range(1), nargs="+", default=[4096, 8192], help="tokens")
    parser.add_argument("--hidden", type=int_range(1), default=576, help="hidden size")
    parser.add_argument("--vocab", type=int_range(1), default=49152, help="vocabulary size")
    parser.add_argument("--loss-chunk-size", "--chunk", dest="chunk", type=int_range(1), default=4096,
                        help="tokens per lm_head + cross-entropy chunk")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one measurement, printed as JSON
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.hidden, args.vocab, args.chunk, args.device)))
        return
    print(f"hidden {args.hidden}, vocab {args.vocab}, chunk {args.chunk}, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("| tokens | full logits: peak extra | chunked: peak extra | saved | full s | chunked s | loss equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tokens in args.lengths:
        res = {}
        for variant in ("full", "chunked"):
            cmd = [sys.executable, __file__, "--one", variant, str(tokens), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--device", args.device]
            res[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        full, chunked = res["full"], res["chunked"]
        same = abs(full["loss"] - chunked["loss"]) <= 1e-5 * abs(full["loss"])
        print(f"| {tokens} | {full['peak_extra_mib']:.0f} MiB | {chunked['peak_extra_mib']:.0f} MiB | "
              f"{full['peak_extra_mib'] / max(chunked['peak_extra_mib'], 1):.1f}x | {full['seconds']:.1f} | "
              f"{chunked['seconds']:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
