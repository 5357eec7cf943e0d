"""``SeqParallelTrainer``: HuggingFace ``Trainer`` with exact sequence-parallel attention.

A plain ``transformers.Trainer`` gives every process its own samples and feeds each whole sequence to the model, which
is wrong for a model whose attention is split over a group of processes (the shard guard refuses it). This subclass:

* switches the model to the method (:func:`easy_context.apply_seq_parallel_monkey_patch`), over the current
  sequence-parallel group or a ``(dp, sp)`` mesh made with ``sp_size``;
* gives every rank of a sequence-parallel group the same batches and different groups different ones
  (:func:`easy_context.prepare_dataloader`), for training and evaluation;
* shifts HF's unshifted ``labels`` over the whole sequence before sharding, pads to the layout's multiple with
  ``-100`` and gives each rank its shard (:func:`easy_context.prepare_seq_parallel_inputs`);
* returns each rank's share of the exact token-weighted loss of the whole accumulated batch: the sum of its valid
  targets' cross entropy times the number of processes, over the valid-target count of every replica's accumulated
  micro-batches. DDP/DeepSpeed average gradients over the processes, and ``Trainer`` logs the mean over processes,
  so both equal single-process training on the same data.

Logging, gradient accumulation, checkpointing and resume, and ``evaluate`` (the loss) work as in ``Trainer``.
``compute_metrics`` needs full logits and is refused; gather them with :func:`easy_context.gather_seq_parallel` in
your own loop.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .comm import group_rank, group_size
from .data import prepare_dataloader, prepare_seq_parallel_inputs
from .loss import IGNORE_INDEX
from .mesh import get_mesh, get_sequence_parallel_group, setup_mesh
from .methods import get_method
from .patch import apply_seq_parallel_monkey_patch

try:
    from transformers import Trainer
except ImportError:  # pragma: no cover
    Trainer = object

__all__ = ["SeqParallelTrainer", "shift_labels"]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction from HF's unshifted ``labels``: ``labels[:, 1:]`` and ``-100`` last."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class SeqParallelTrainer(Trainer):
    """``transformers.Trainer`` plus ``seq_algo`` (a method name) and optional ``sp_size`` (processes per
    sequence-parallel group; default: all processes, or the mesh already set up)."""

    def __init__(self, model=None, args=None, *trainer_args, seq_algo: str = "zigzag_ring_attn",
                 sp_size: Optional[int] = None, **trainer_kwargs):
        if Trainer is object:  # pragma: no cover
            raise ImportError("SeqParallelTrainer needs transformers: pip install transformers")
        self.seq_method = get_method(seq_algo)
        if trainer_kwargs.get("compute_metrics") is not None:
            raise ValueError("SeqParallelTrainer evaluates the loss only: compute_metrics needs the full logits, which "
                             "are sharded over ranks. Drop compute_metrics, or gather logits with "
                             "easy_context.gather_seq_parallel in your own evaluation loop")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        world = group_size(None)
        if sp_size is not None and get_mesh() is None and group_size(get_sequence_parallel_group()) != sp_size:
            setup_mesh(sp_size, device_type="cuda" if torch.cuda.is_available() else "cpu")
        self.sp_size = group_size(get_sequence_parallel_group())
        if world % self.sp_size:
            raise ValueError(f"sp_size={self.sp_size} does not divide the {world} processes")
        apply_seq_parallel_monkey_patch(self.seq_method, self.accelerator.unwrap_model(self.model))
        self.loss_is_scaled_for_ga = True  # compute_loss already divides by the whole accumulated batch

    # ------------------------------------------------------------------------------------------------ data
    def _with_group_loader(self, build):
        original = self.accelerator.prepare

        def prepare(*objects, **kwargs):
            if len(objects) == 1 and isinstance(objects[0], torch.utils.data.DataLoader):
                return prepare_dataloader(self.seq_method, objects[0], self.accelerator, sp_size=self.sp_size)
            return original(*objects, **kwargs)

        self.accelerator.prepare = prepare
        try:
            return build()
        finally:
            del self.accelerator.prepare

    def get_train_dataloader(self):
        return self._with_group_loader(super().get_train_dataloader)

    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_group_loader(lambda: super(SeqParallelTrainer, self).get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return self._with_group_loader(lambda: super(SeqParallelTrainer, self).get_test_dataloader(test_dataset))

    # ------------------------------------------------------------------------------------------------ loss
    def _valid_targets_everywhere(self, batches) -> torch.Tensor:
        """Valid next-token targets in ``batches`` (this replica's), summed over every data-parallel replica."""
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        total = torch.tensor([float(count)], dtype=torch.float64)
        if group_size(None) > 1:
            device = self.args.device if dist.get_backend() == "nccl" else torch.device("cpu")
            total = total.to(device)
            dist.all_reduce(total)
            total = total.cpu() / self.sp_size  # every rank of a group counted the same batches
        return total[0]

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches or "labels" not in batches[0]:
            return batches, None
        return batches, self._valid_targets_everywhere(batches)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("SeqParallelTrainer needs 'labels' in every batch (use a causal-LM collator, e.g. "
                             "DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        if inputs.get("attention_mask") is not None and not bool(inputs["attention_mask"].all()):
            raise ValueError("SeqParallelTrainer cannot honour padding in attention_mask: pad at the end with "
                             "labels -100 and drop attention_mask (causal attention never lets a real token see it)")
        if num_items_in_batch is None:
            num_items_in_batch = self._valid_targets_everywhere([inputs])
        group = get_sequence_parallel_group()
        local = prepare_seq_parallel_inputs(
            self.seq_method, inputs["input_ids"], inputs.get("position_ids"), shift_labels(labels),
            group_rank(group), group_size(group), inputs["input_ids"].device, pad=True,
            pad_token_id=0, group=group)
        outputs = model(input_ids=local["local_input_ids"], position_ids=local["local_position_ids"],
                        use_cache=False)
        logits = outputs.logits
        loss_sum = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), local["local_target_ids"].flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum")
        count = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=loss_sum.device).clamp_min(1)
        loss = loss_sum * group_size(None) / count
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None
