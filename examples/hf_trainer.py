"""Long-context fine-tuning with HuggingFace's Trainer: ``SeqParallelTrainer`` is ``transformers.Trainer`` plus
``seq_algo=``, and every sequence is split over the processes of a group with exact attention.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml examples/hf_trainer.py --cpu   # CPU
    accelerate launch --config_file accelerate_configs/single_node.yaml examples/hf_trainer.py        # GPUs
    torchrun --nproc_per_node 2 examples/hf_trainer.py --cpu                                            # CPU, torchrun

The dataset is HF's usual causal-LM shape: ``input_ids`` and unshifted ``labels`` (a copy of ``input_ids``, -100 where
nothing is to be learned). The trainer shifts the labels over the whole sequence before sharding it, pads to the
method's multiple, and logs the exact token-weighted loss: the numbers one process would log with ``Trainer``.
The defaults fine-tune the embedded SmolLM2-135M on Jane Austen's novels (``bash scripts/setup.sh`` fetches both).
"""

import argparse

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from easy_context import SeqParallelTrainer, available_methods


class Windows(Dataset):
    """Consecutive windows of ``seq_length`` tokens, as ``input_ids`` and unshifted ``labels``."""

    def __init__(self, tokens: torch.Tensor, seq_length: int):
        self.tokens, self.seq_length = tokens, seq_length

    def __len__(self):
        return len(self.tokens) // self.seq_length

    def __getitem__(self, i):
        window = self.tokens[i * self.seq_length: (i + 1) * self.seq_length]
        return {"input_ids": window, "labels": window.clone()}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", default=None, help="a .txt file to train on (default: the embedded Austen novels)")
    p.add_argument("--parallel-mode", default="zigzag_ring_attn",
                   choices=[m for m in available_methods() if m != "dca"])
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence, over all ranks of a group")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--output-dir", default="outputs/hf_trainer")
    p.add_argument("--cpu", action="store_true", help="train on CPU (gloo) even where CUDA is available")
    return p.parse_args()


def main():
    args = parse_args()
    if args.model is None or args.text is None:
        from easy_context.assets import austen_text, smollm2_path
    path = args.model or smollm2_path()
    text = open(args.text, encoding="utf-8").read() if args.text else austen_text()
    tokens = torch.tensor(AutoTokenizer.from_pretrained(path)(text)["input_ids"])

    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=1, max_steps=args.steps,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        gradient_checkpointing=True,
        report_to=[], use_cpu=args.cpu, disable_tqdm=True, seed=0, data_seed=0)
    trainer = SeqParallelTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                 args=training_args, train_dataset=Windows(tokens, args.seq_length),
                                 seq_algo=args.parallel_mode)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print("losses " + " ".join(f"{loss:.6f}" for loss in losses))


if __name__ == "__main__":
    main()
