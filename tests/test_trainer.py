"""``SeqParallelTrainer`` on 2 gloo processes logs the losses of ``transformers.Trainer`` on one process.

Same model, data, arguments and seed; gradient accumulation over micro-batches with different numbers of valid
labels, so the loss must be token-weighted over the whole accumulated batch. A plain ``Trainer`` given a
sequence-parallel model on 2 processes is refused with an error naming ``SeqParallelTrainer``.
"""

import pytest
import torch

from distributed import run_distributed
from reference import FP32_TOL
from tiny_models import tiny_model

SEQ_LEN = 64
STEPS = 4


class _Samples(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 128, (n, SEQ_LEN), generator=g)
        self.masked = torch.randint(0, SEQ_LEN // 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: int(self.masked[i])] = -100  # samples differ in their number of valid labels
        return {"input_ids": self.ids[i], "labels": labels}


def _args(output_dir, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=output_dir, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                  gradient_accumulation_steps=2, max_steps=STEPS, logging_steps=1, learning_rate=5e-3,
                  lr_scheduler_type="constant", seed=0, data_seed=0, report_to=[], use_cpu=True,
                  save_strategy="no", remove_unused_columns=False, disable_tqdm=True, max_grad_norm=1e9)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _train(rank, world_size, output_dir, sequence_parallel):
    from transformers import Trainer

    import easy_context as ec

    data = _Samples()
    if not sequence_parallel:
        trainer = Trainer(model=tiny_model("llama"), args=_args(output_dir), train_dataset=data, eval_dataset=data)
        trainer.train()
        return _losses(trainer), trainer.evaluate()["eval_loss"], None, None
    # A plain Trainer given a sequence-parallel model: every rank gets other samples, each taken as a whole sequence.
    plain = tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch("zigzag_ring_attn", plain)
    try:
        Trainer(model=plain, args=_args(output_dir + "-plain"), train_dataset=data).train()
        refusal = None
    except ValueError as err:
        refusal = str(err)
    trainer = ec.SeqParallelTrainer(model=tiny_model("llama"), args=_args(output_dir, save_strategy="steps",
                                                                           save_steps=2),
                                    train_dataset=data, eval_dataset=data, seq_algo="zigzag_ring_attn")
    trainer.train()
    losses, eval_loss = _losses(trainer), trainer.evaluate()["eval_loss"]
    resumed = ec.SeqParallelTrainer(model=tiny_model("llama", seed=1), args=_args(output_dir), train_dataset=data,
                                    seq_algo="zigzag_ring_attn")
    resumed.train(resume_from_checkpoint=f"{output_dir}/checkpoint-2")
    return losses, eval_loss, refusal, _losses(resumed)


@pytest.mark.slow
def test_seq_parallel_trainer_logs_the_single_process_losses(tmp_path):
    ref_losses, ref_eval, _, _ = run_distributed(_train, 1, str(tmp_path / "one"), False)[0]
    got = run_distributed(_train, 2, str(tmp_path / "two"), True, timeout=600)
    assert len(ref_losses) == STEPS
    for rank, (losses, eval_loss, refusal, resumed) in enumerate(got):
        assert losses == pytest.approx(ref_losses, rel=FP32_TOL), f"rank {rank}: {losses} vs {ref_losses}"
        assert eval_loss == pytest.approx(ref_eval, rel=FP32_TOL)
        assert refusal is not None and "SeqParallelTrainer" in refusal, refusal
        assert resumed == pytest.approx(ref_losses, rel=FP32_TOL), f"rank {rank}: resumed {resumed}"  # 2 saved + 2 new
