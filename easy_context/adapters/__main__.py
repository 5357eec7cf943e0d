"""Command line of :mod:`easy_context.adapters`; see ``python -m easy_context.adapters --help``."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from ._safetensors import CheckpointError
from .extract import extract_lora
from .merge import apply_adapter
from .plan import AdapterError, AdapterWarning

EXAMPLES = """examples:
  python -m easy_context.adapters extract --base assets/smollm2-135m --tuned outputs/run --out adapter --rank 16
  python -m easy_context.adapters extract --base B --tuned T --out A --rank 64 --energy 0.99 --exclude 'layers\\.0\\.'
  python -m easy_context.adapters apply --model other-finetune --adapter adapter --out merged
"""


def _folders(parser: argparse.ArgumentParser, **helps: str) -> None:
    """Required folder options, ``--NAME`` for each keyword, in order."""
    for name, text in helps.items():
        parser.add_argument(f"--{name}", required=True, help=text)


def _overwrite_and_quiet(parser: argparse.ArgumentParser, overwrite_help: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m easy_context.adapters",
        description="Extract a LoRA adapter from a long-context fine-tune (truncated SVD of the weight difference, "
        "layer by layer) and merge it into a model of the same architecture, carrying the long-context config "
        "(RoPE base, RoPE scaling, max_position_embeddings).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{extract,apply}")

    ex = sub.add_parser("extract", help="extract a PEFT LoRA adapter from TUNED - BASE",
                        description="Extract a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) "
                        "from the difference between a fine-tune and its base, with the fine-tune's long-context "
                        "config in long_context.json and a report in extraction_report.json. Both models must be "
                        "local folders with safetensors weights.")
    _folders(ex, base="folder of the base model", tuned="folder of the fine-tuned model",
             out="folder to write the adapter to")
    ex.add_argument("--rank", "--max-rank", type=int, required=True, dest="rank",
                    help="maximum LoRA rank; each module gets at most this rank")
    ex.add_argument("--energy", type=float, default=None,
                    help="per-module rank: the smallest keeping this fraction of ||ΔW||² (e.g. 0.99), at most "
                    "--rank; written to PEFT's rank_pattern")
    ex.add_argument("--include", action="append", default=[], metavar="REGEX",
                    help="only modules whose name matches (re.search; repeatable)")
    ex.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                    help="leave out modules whose name matches (re.search; repeatable)")
    ex.add_argument("--embeddings", choices=("lora", "whole"), default="lora",
                    help="changed embeddings as LoRA embedding factors (default) or saved whole (modules_to_save)")
    ex.add_argument("--undecomposable", choices=("error", "skip", "whole"), default="error",
                    help="changed modules that are neither linear nor embedding nor small (e.g. fused expert "
                    "tensors): stop with an error (default), skip them, or save them whole")
    ex.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the saved adapter (ΔW and the SVD are computed in float32/float64)")
    ex.add_argument("--device", default="cpu", help="device for the SVD arithmetic (default cpu)")
    _overwrite_and_quiet(ex, "replace an existing adapter in --out")

    ap = sub.add_parser("apply", help="merge an adapter into a model and carry the long-context config",
                        description="Merge a LoRA adapter into MODEL (same architecture as the adapter's base) and "
                        "write the merged model to OUT, with the adapter's long-context config values "
                        "(long_context.json) written into OUT/config.json. Warns when MODEL's RoPE settings differ "
                        "from the adapter's base.")
    _folders(ap, model="folder of the model to merge into",
             adapter="adapter folder (from extract, or any PEFT LoRA adapter)",
             out="folder to write the merged model to")
    _overwrite_and_quiet(ap, "replace an existing folder at --out")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr, flush=True)

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with warnings.catch_warnings():  # restores the caller's warning settings afterwards
        warnings.showwarning = show_warning
        warnings.simplefilter("always", AdapterWarning)
        try:
            if args.command == "extract":
                extract_lora(args.base, args.tuned, args.out, args.rank, energy=args.energy, include=args.include,
                             exclude=args.exclude, embeddings=args.embeddings, undecomposable=args.undecomposable,
                             dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                             progress=not args.quiet, log=log)
            else:
                apply_adapter(args.model, args.adapter, args.out, overwrite=args.overwrite, progress=not args.quiet,
                              log=log)
        except (AdapterError, CheckpointError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
