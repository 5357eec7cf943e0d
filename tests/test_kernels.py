"""The block primitive and the merge, against a float64 reference."""

import pytest
import torch

from easy_context.kernels import block_attention, block_attention_backward, count_block_work, merge, select_backend
from reference import BF16_TOL, FP32_TOL, random_qkv, reference_attention, rel_err


@pytest.mark.parametrize("backend", ["torch_cpu", "math"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_block_attention_forward_and_backward(backend, causal, heads, kv_heads):
    q, k, v, dout = random_qkv(2, heads, kv_heads, 96, 64, torch.float32, seed=heads + causal)
    out, lse = block_attention(q, k, v, causal, backend=backend)
    dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, causal, backend=backend)
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q, k, v, causal)
    ref_out.backward(dout.double())
    for a, b in ((out, ref_out), (lse, ref_lse), (dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert a.shape == b.shape
        assert rel_err(a, b) <= FP32_TOL
    assert lse.dtype == torch.float32


def test_bf16_block_keeps_float32_lse():
    q, k, v, _ = random_qkv(1, 4, 2, 32, 64, torch.bfloat16, seed=0)
    out, lse = block_attention(q, k, v, True)
    ref_out, ref_lse = reference_attention(q, k, v, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(out, ref_out) <= BF16_TOL and rel_err(lse, ref_lse) <= BF16_TOL


def test_merge_of_key_blocks_equals_attention_over_all_keys():
    q, _, _, _ = random_qkv(1, 4, 4, 48, 32, torch.float32, seed=1)
    _, k, v, _ = random_qkv(1, 4, 4, 144, 32, torch.float32, seed=2)
    out = lse = None
    for i in range(3):
        block = slice(48 * i, 48 * (i + 1))
        out, lse = merge(out, lse, *block_attention(q, k[:, :, block], v[:, :, block]))
    ref_out, ref_lse = reference_attention(q, k, v, False)
    assert rel_err(out, ref_out) <= FP32_TOL and rel_err(lse, ref_lse) <= FP32_TOL


def test_merge_treats_minus_inf_as_empty():
    q, k, v, _ = random_qkv(1, 2, 2, 8, 16, torch.float32, seed=3)
    out, lse = block_attention(q, k, v)
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    merged_out, merged_lse = merge(empty_out.clone(), empty_lse.clone(), out, lse)
    assert torch.equal(merged_out, out) and torch.equal(merged_lse, lse)
    merged_out, merged_lse = merge(out.clone(), lse.clone(), empty_out, empty_lse)
    assert torch.equal(merged_out, out) and torch.equal(merged_lse, lse)


def test_work_counter_counts_causal_blocks_as_half():
    q, k, v, _ = random_qkv(1, 2, 2, 16, 16, torch.float32, seed=4)
    with count_block_work() as work:
        block_attention(q, k, v, causal=True)
        block_attention(q, k, v, causal=False)
    assert work.calls == 2 and work.pairs == 16 * 16 * 1.5


def test_bad_shapes_and_backends_are_named():
    q, k, v, _ = random_qkv(1, 6, 4, 8, 16, torch.float32, seed=5)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4"):
        block_attention(q, k, v)
    q, k, v, _ = random_qkv(1, 4, 2, 8, 16, torch.float32, seed=5)
    with pytest.raises(ValueError, match="square block"):
        block_attention(q, k[:, :, :4], v[:, :, :4], causal=True)
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn'"):
        select_backend(q, "cudnn")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'easy-context\[cuda\]'"):
            select_backend(q, "flash_attn")
