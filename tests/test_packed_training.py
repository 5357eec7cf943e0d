"""Packed documents through a patched model: loss and every parameter gradient equal each document run on its own.

A packed row holds several documents with ``position_ids`` restarting at 0 at each one, as transformers'
``DataCollatorWithFlattening`` writes them. The reference runs every document as its own sequence on one process and
sums the token losses over the global count of targets; the sequence-parallel run shards the packed row with
``prepare_seq_parallel_inputs`` and the attention finds the document boundaries itself (tiny Llama, Mistral and
Qwen2, float32, relative error 1e-5).
"""

from typing import List

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed, sharded_step
from reference import DIFFERS, FP32_TOL, rel_err
from tiny_models import FAMILIES, tiny_model

SEQ_LEN = 96  # divisible by 2*4 for zigzag at P=4
METHODS = ["ring_attn", "zigzag_ring_attn", "stripe_attn", "ulysses_attn", "usp_attn", "dist_flash_attn"]


def _short_documents(seed: int) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < SEQ_LEN:
        lengths.append(min(int(torch.randint(1, 7, (), generator=g)), SEQ_LEN - sum(lengths)))
    return lengths


# Row 0: documents crossing every shard and zigzag chunk boundary, two of one token. Row 1: many short documents.
ROWS = [[5, 1, 40, 13, 1, 36], _short_documents(0)]


def packed_batch(rows=ROWS, vocab: int = 128, seed: int = 0):
    """Token ids, restarting position ids and targets (-100 on each document's last token) of packed rows."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (len(rows), SEQ_LEN), generator=g)
    next_ids = torch.randint(0, vocab, (len(rows), SEQ_LEN), generator=g)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])
    target_ids = next_ids.clone()
    for b, lengths in enumerate(rows):
        ends = torch.tensor(lengths).cumsum(0) - 1
        target_ids[b, ends] = -100  # a document's last token predicts nothing
    return input_ids, position_ids, target_ids


def per_document_reference(family: str, rows=ROWS):
    """Loss and gradients of every document run as its own sequence: summed token losses over the global count."""
    model = tiny_model(family)
    input_ids, _, target_ids = packed_batch(rows)
    total, count = 0.0, int((target_ids != -100).sum())
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            ids, targets = input_ids[b:b + 1, start:start + n], target_ids[b:b + 1, start:start + n]
            logits = model(ids, position_ids=torch.arange(n)[None], use_cache=False).logits
            total = total + F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                            reduction="sum")
            start += n
    loss = total / count
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _packed_steps(rank, world_size, methods):
    import easy_context as ec

    results = {}
    input_ids, position_ids, target_ids = packed_batch()
    for method in methods:
        for family in FAMILIES:
            model = tiny_model(family)
            ec.apply_seq_parallel_monkey_patch(method, model)
            loss, _, grads = sharded_step(model, method, input_ids, position_ids, target_ids, rank, world_size)
            results[method, family] = (loss, grads)
    return results if rank == 0 else None


def _check(got, methods, world_size):
    for family in FAMILIES:
        ref_loss, ref_grads = per_document_reference(family)
        for method in methods:
            loss, grads = got[method, family]
            assert rel_err(loss, ref_loss) <= FP32_TOL, f"{method} P={world_size} {family}: loss {loss} vs {ref_loss}"
            for name, ref in ref_grads.items():
                err = rel_err(grads[name], ref)
                assert err <= FP32_TOL, f"{method} P={world_size} {family}: grad {name} relative error {err:.2e}"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_packed_rows_train_as_separate_documents(world_size):
    got = run_distributed(_packed_steps, world_size, METHODS)[0]
    _check(got, METHODS, world_size)


def test_the_reference_is_not_one_causal_span():
    """The per-document reference differs from the packed row read as one sequence, so the test above can fail."""
    model = tiny_model("llama")
    input_ids, _, target_ids = packed_batch()
    logits = model(input_ids, use_cache=False).logits
    one_span = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), ignore_index=-100)
    assert rel_err(one_span.detach(), per_document_reference("llama")[0]) > DIFFERS


# ---------------------------------------------------------------------------------------------------- train.py
@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """Austen cut into 60 documents of 100-400 characters: every 128-token sample packs several of them."""
    import json

    from easy_context.assets import austen_text

    text, docs, start = austen_text()[5000:], [], 0
    for i in range(60):
        n = 100 + (i * 37) % 300
        docs.append(text[start:start + n])
        start += n
    path = tmp_path_factory.mktemp("short") / "short.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


@pytest.mark.real_model
def test_train_py_reset_position_ids_on_two_ranks_equals_one_process(tmp_path, short_documents):
    """train.py --reset-position-ids: zigzag ring on 2 processes gives the 1-process data_parallel run's loss (which
    transformers' own attention masks across documents) at every step."""
    from test_train import _losses, _train

    from easy_context.assets import load_tokenizer
    from easy_context.training import open_samples

    tokenizer = load_tokenizer()
    samples = open_samples(short_documents, tokenizer, 128, tokenizer.eos_token_id, reset_position_ids=True,
                           progress=False)
    assert all(int((samples["position_ids"][i] == 0).sum()) >= 2 for i in range(4))  # several documents each
    args = ["--dataset", short_documents, "--reset-position-ids"]
    _train(tmp_path / "one", *args, "--parallel-mode", "data_parallel")
    _train(tmp_path / "two", *args, "--parallel-mode", "zigzag_ring_attn", config="cpu_2proc.yaml")
    reference, losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(losses) == len(reference) == 3
    for step, (got, ref) in enumerate(zip(losses, reference), 1):
        assert abs(got - ref) <= FP32_TOL * abs(ref), f"step {step}: loss {got!r} vs one process {ref!r}"


# ---------------------------------------------------------------------------------------------------- Trainer
class _Documents(torch.utils.data.Dataset):
    """Documents of 3 to 40 tokens, as a tokenized dataset gives them to DataCollatorWithFlattening."""

    def __init__(self, n=32):
        g = torch.Generator().manual_seed(5)
        self.docs = [torch.randint(0, 128, (int(torch.randint(3, 41, (), generator=g)),), generator=g).tolist()
                     for _ in range(n)]

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return {"input_ids": self.docs[i]}


def _trainer_losses(rank, world_size, output_dir, method):
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    import easy_context as ec

    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=3, logging_steps=1, learning_rate=5e-3, lr_scheduler_type="constant", seed=0,
                             data_seed=0, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, max_grad_norm=1e9)
    model = tiny_model("llama", use_cache=False)  # with a cache, transformers' attention does not see the packing
    kwargs = dict(model=model, args=args, train_dataset=_Documents(), data_collator=DataCollatorWithFlattening())
    trainer = Trainer(**kwargs) if method is None else ec.SeqParallelTrainer(**kwargs, seq_algo=method)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_seq_parallel_trainer_with_data_collator_with_flattening(tmp_path):
    """SeqParallelTrainer with DataCollatorWithFlattening (one packed row per micro-batch, positions restarting at
    each document) on 2 processes logs the 1-process Trainer's losses, whose attention masks across documents."""
    reference = run_distributed(_trainer_losses, 1, str(tmp_path / "one"), None)[0]
    losses = run_distributed(_trainer_losses, 2, str(tmp_path / "two"), "zigzag_ring_attn")[0]
    assert len(losses) == len(reference) == 3
    for step, (got, ref) in enumerate(zip(losses, reference), 1):
        assert abs(got - ref) <= FP32_TOL * abs(ref), f"step {step}: loss {got!r} vs one process {ref!r}"
