"""The loss chunk sized from memory (easy_context.loss.auto_loss_chunk_size, train.py --loss-chunk-size auto): its
size, and a loss and gradients equal to the plain full-logits computation."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from easy_context import training as T
from easy_context.loss import (auto_loss_chunk_size, chunked_cross_entropy_sum, loss_bytes_per_chunk_token,
                               loss_chunk_size_for_budget, resolve_loss_chunk_size)
from reference import rel_err
from tiny_models import tiny_model

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, vocab_size=49152)


@pytest.mark.parametrize("tokens", [1, 4096, 8192, 16384, 65536, 1 << 20])
def test_auto_chunk_keeps_the_loss_under_one_layer_working_set(tokens):
    chunk = auto_loss_chunk_size(tokens, **SMOLLM2)
    assert chunk % 256 == 0 and 256 <= chunk <= max(256, -(-tokens // 256) * 256)
    if chunk > 256:  # above the floor, the loss rows fit in half of one layer's recompute working set
        assert chunk * loss_bytes_per_chunk_token(49152) <= tokens * (8 * 576 + 6 * 1536) * 4 / 2
    bf16 = auto_loss_chunk_size(tokens, dtype_bytes=2, **SMOLLM2)
    assert bf16 <= chunk


def test_auto_chunk_shrinks_with_the_local_tokens():
    sizes = [auto_loss_chunk_size(t, **SMOLLM2) for t in (65536, 32768, 16384, 8192)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 7 * sizes[-1]
    assert loss_chunk_size_for_budget(2 ** 30, 49152) == 1792  # 1 GiB of 3 float32 rows of 49152
    assert loss_bytes_per_chunk_token(32000, 2) == 14 * 32000  # and the bfloat16 logits
    assert resolve_loss_chunk_size(4096, 100, **SMOLLM2) == 4096
    assert resolve_loss_chunk_size("auto", 16384, **SMOLLM2) == auto_loss_chunk_size(16384, **SMOLLM2)
    with pytest.raises(ValueError, match="positive"):
        resolve_loss_chunk_size(0, 100, **SMOLLM2)


def test_auto_chunk_loss_and_gradients_equal_the_full_logits_computation():
    g = torch.Generator().manual_seed(0)
    tokens, hidden, vocab = 1000, 64, 8192
    chunk = auto_loss_chunk_size(tokens, hidden_size=hidden, intermediate_size=128, vocab_size=vocab)
    assert chunk < tokens  # several chunks
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[:37] = -100
    total, count = chunked_cross_entropy_sum(h, w, targets, chunk_size=chunk)
    total.backward()
    got = (total.detach(), h.grad.clone(), w.grad.clone())
    h.grad, w.grad = None, None
    ref = F.cross_entropy(h @ w.T, targets, ignore_index=-100, reduction="sum")
    ref.backward()
    assert count == tokens - 37
    assert rel_err(got[0], ref.detach()) <= 1e-6
    assert rel_err(got[1], h.grad) <= 1e-6 and rel_err(got[2], w.grad) <= 1e-6


def test_chunked_loss_model_with_auto_chunks_equals_full_logits():
    model = tiny_model("llama", vocab_size=4096)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (1, 600), generator=g)
    targets = torch.randint(0, 4096, (1, 600), generator=g)
    positions = torch.arange(600)[None]
    config = model.config
    assert auto_loss_chunk_size(600, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                vocab_size=4096) < 600
    loss_sum, count = T.ChunkedLossModel(model, chunk_size="auto")(ids, positions, targets)
    (loss_sum / count).backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids, position_ids=positions).logits
    ref = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    ref.backward()
    assert rel_err(loss_sum / count, ref) <= 1e-6
    for name, p in model.named_parameters():
        assert rel_err(chunked[name], p.grad) <= 1e-6, name


def test_the_option_takes_a_number_or_auto():
    assert T.loss_chunk_size_arg("auto") == "auto" and T.loss_chunk_size_arg("512") == 512
    for bad in ("0", "-3", "big"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            T.loss_chunk_size_arg(bad)
