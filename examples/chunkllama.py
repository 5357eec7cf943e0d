"""Dual Chunk Attention (ChunkLlama): a model reads past the length it was trained at, with no training.

    python examples/chunkllama.py                   # SmolLM2-135M, trained at 8K tokens, reading 16K (a few minutes)
    python examples/chunkllama.py --length 32768    # 4x its trained length

It scores the last ``--tail`` tokens of a ``--length``-token text twice: with the model's own attention, and after
ChunkLlama's call, ``replace_with_chunkllama(pretraining_length=...)``, made before the model is loaded as ChunkLlama's
README does. Past the trained length the plain model's perplexity explodes while DCA's stays near its short-context
value. The defaults read Jane Austen's novels with the embedded SmolLM2-135M (``bash scripts/setup.sh`` fetches both).
"""

import argparse
import math
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from easy_context import replace_with_chunkllama


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a Llama-family model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", default=None, help="a .txt file to read (default: the embedded Austen novels)")
    p.add_argument("--length", type=int, default=16384, help="tokens of context")
    p.add_argument("--tail", type=int, default=2048, help="score the last N tokens")
    p.add_argument("--pretraining-length", type=int, default=None,
                   help="the length the model was trained at (default: its max_position_embeddings)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    return p.parse_args()


@torch.no_grad()
def tail_perplexity(model, tokens: torch.Tensor, tail: int) -> float:
    """exp(mean NLL) of the last ``tail`` tokens of ``tokens`` given everything before them."""
    logits = model(tokens[None, :-1], logits_to_keep=tail).logits[0].float()  # only the last `tail` positions
    return math.exp(torch.nn.functional.cross_entropy(logits, tokens[-tail:]).item())


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None or args.text is None:
        from easy_context.assets import austen_text, smollm2_path
    path = args.model or smollm2_path()
    text = open(args.text, encoding="utf-8").read() if args.text else austen_text()
    trained = args.pretraining_length or AutoConfig.from_pretrained(path).max_position_embeddings
    if not 0 < args.tail < args.length:
        raise SystemExit(f"--tail {args.tail} must be between 1 and --length {args.length} - 1")

    tokens = torch.tensor(AutoTokenizer.from_pretrained(path)(text[: args.length * 8])["input_ids"][: args.length + 1])
    if len(tokens) <= args.length:
        raise SystemExit(f"the text has only {len(tokens)} tokens; lower --length or give a longer --text")

    results = {}
    for name in ("plain", "dca"):
        if name == "dca":
            replace_with_chunkllama(pretraining_length=trained)  # every Llama created from now on runs DCA
        start = time.time()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[name] = tail_perplexity(model, tokens, args.tail)
        print(f"{name:5s}  perplexity of the last {args.tail} of {args.length} tokens: {results[name]:9.2f}   "
              f"({time.time() - start:.0f} s)", flush=True)
    print(f"trained length {trained}; the text is {args.length / trained:.1f}x that")


if __name__ == "__main__":
    main()
