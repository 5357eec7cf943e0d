"""Long-context fine-tuning in your own training loop: an exact sequence-parallel attention in a plain accelerate loop.

Every process of a sequence-parallel group holds 1/P of each sequence; the attention is exact, so the losses equal
those of one process holding the whole sequence. Launch it with one of:

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_2proc.yaml examples/train_loop.py
    accelerate launch --config_file accelerate_configs/single_node.yaml examples/train_loop.py        # GPUs
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/train_loop.py                         # CPU, torchrun

On CPU a plain ``Accelerator()`` joins the processes only with ``ACCELERATE_USE_CPU=true`` (or ``cpu=True``).
The defaults fine-tune the embedded SmolLM2-135M on Jane Austen's novels (``bash scripts/setup.sh`` fetches both).
"""

import argparse

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from easy_context import (apply_seq_parallel_monkey_patch, available_methods, prepare_dataloader,
                          prepare_seq_parallel_inputs, seq_parallel_cross_entropy)


class Windows(Dataset):
    """Consecutive windows of ``seq_length + 1`` tokens; each row is one whole causal span."""

    def __init__(self, tokens: torch.Tensor, seq_length: int):
        self.tokens, self.seq_length = tokens, seq_length

    def __len__(self):
        return (len(self.tokens) - 1) // self.seq_length

    def __getitem__(self, i):
        window = self.tokens[i * self.seq_length: (i + 1) * self.seq_length + 1]
        return {"input_ids": window[:-1],
                "target_ids": window[1:].clone(),               # the next token (-100 where none is to be predicted)
                "position_ids": torch.arange(self.seq_length)}  # global positions 0 .. S-1


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", default=None, help="a .txt file to train on (default: the embedded Austen novels)")
    p.add_argument("--parallel-mode", default="zigzag_ring_attn", choices=available_methods())
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence, over all ranks of a group")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    if args.model is None or args.text is None:
        from easy_context.assets import austen_text, smollm2_path
    path = args.model or smollm2_path()
    text = open(args.text, encoding="utf-8").read() if args.text else austen_text()

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = torch.tensor(tokenizer(text)["input_ids"])
    loader = DataLoader(Windows(tokens, args.seq_length), batch_size=1, shuffle=True)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    apply_seq_parallel_monkey_patch(args.parallel_mode, model)  # this model now runs the method; others do not
    model.config.use_cache = False  # no KV cache while training
    recompute = {"use_reentrant": False}  # recompute each layer in backward: activations of one layer at a time
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(recompute)
    else:
        model.gradient_checkpointing_enable(recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    loader = prepare_dataloader(args.parallel_mode, loader, accelerator)  # every rank of a group: the same batches
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    for step, batch in enumerate(loader, start=1):
        local = prepare_seq_parallel_inputs(args.parallel_mode, batch["input_ids"], batch["position_ids"],
                                            batch["target_ids"], accelerator.process_index,
                                            accelerator.num_processes, accelerator.device)
        logits = model(local["local_input_ids"], position_ids=local["local_position_ids"]).logits
        loss = seq_parallel_cross_entropy(logits, local["local_target_ids"])  # the global token mean, exact
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"step {step}/{args.steps} loss {loss.item():.6f}")  # the same value on every rank
        if step == args.steps:
            break


if __name__ == "__main__":
    main()
