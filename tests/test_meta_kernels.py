"""The CUDA backends and every schedule, run on ``device="meta"`` tensors; and the backend selection table.

PyTorch's fused attention ops have meta kernels (on torch 2.13 all six of
``aten._scaled_dot_product_{flash,cudnn,efficient}_attention`` and their ``_backward`` ops do): called with meta
tensors they bind their arguments and compute output shapes and dtypes without data and without a GPU. So on CPU, in
CI, these tests catch a torch release that renames or reorders an op's arguments, changes what it returns (the LSE's
shape: flash ``(B, H, S)``, cuDNN ``(B, H, S, 1)``, memory-efficient padded to a multiple of 32), or no longer accepts
a placeholder this package passes (``None`` for the dense-input cumulative lengths and cuDNN's bias, the philox
seed/offset tensors). They do not check numerics, and a meta kernel checks less than its CUDA kernel: the flash and
cuDNN meta kernels accept fewer K/V heads (as their CUDA kernels do), but so does the memory-efficient forward's,
whose backward meta kernel then gives dK/dV the query's head count, which is why ``torch_cuda`` repeats K/V.

Every schedule runs at world size 1 on meta tensors with each CUDA backend forced (``group=None``): the ring engine,
DistFlashAttn, Ulysses, USP and DCA only shape, slice, concatenate and merge tensors, and ``merge`` is elementwise
(``sigmoid``, ``logsigmoid``, ``where``, ``isneginf``), all of which have meta kernels. Packed documents run too:
document ids are real CPU tensors (the sub-block split reads them), the attention tensors meta. ``flash_attn`` runs
only where the package is installed (its releases since 2.6 register fake kernels for their ops); elsewhere those
cases are skipped.
"""

import pytest
import torch

from easy_context import kernels
from easy_context.kernels import BACKENDS, block_attention, block_attention_backward, choose_backend, select_backend
from easy_context.methods import get_method
from easy_context.methods.base import available_methods
from easy_context.methods.dca import DCAConfig, dual_chunk_attention

HAS_CUDNN_OP = hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
NO_CUDNN_OP = "this torch has no _scaled_dot_product_cudnn_attention"
HALF = (torch.bfloat16, torch.float16)
# (backend, dtypes it takes)
META_BACKENDS = [
    pytest.param("torch_flash", HALF, id="torch_flash"),
    pytest.param("torch_cudnn", HALF, id="torch_cudnn",
                 marks=pytest.mark.skipif(not HAS_CUDNN_OP, reason=NO_CUDNN_OP)),
    pytest.param("torch_cuda", HALF + (torch.float32,), id="torch_cuda"),
    pytest.param("flash_attn", HALF, id="flash_attn",
                 marks=pytest.mark.skipif(kernels._flash_attn_module() is None, reason="flash-attn is not installed")),
]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("EASY_CONTEXT_ATTN_BACKEND", raising=False)


def meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_cuda_backends_are_registered():
    assert set(kernels.CUDA_BACKENDS) <= set(BACKENDS)
    for name in BACKENDS:
        assert name in kernels._FORWARD and name in kernels._BACKWARD


@pytest.mark.parametrize("backend,dtypes", META_BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_backend_forward_and_backward_on_meta(backend, dtypes, head_dim, heads, kv_heads):
    # Square causal blocks and full blocks, the full ones also with more keys than queries and lengths that are no
    # multiple of 32 (the memory-efficient kernel pads its LSE to one).
    for dtype in dtypes:
        for causal, sq, sk in ((True, 40, 40), (False, 40, 40), (False, 40, 72)):
            q, dout = meta(2, heads, sq, head_dim, dtype=dtype), meta(2, heads, sq, head_dim, dtype=dtype)
            k, v = meta(2, kv_heads, sk, head_dim, dtype=dtype), meta(2, kv_heads, sk, head_dim, dtype=dtype)
            case = f"{backend} {dtype} D={head_dim} H={heads}/{kv_heads} causal={causal} {sq}x{sk}"
            out, lse = kernels._FORWARD[backend](q, k, v, causal, head_dim ** -0.5)
            assert out.device.type == "meta", case
            assert (out.shape, out.dtype) == (q.shape, dtype), case
            assert (lse.shape, lse.dtype) == ((2, heads, sq), torch.float32), case
            grads = kernels._BACKWARD[backend](dout, q, k, v, out, lse, causal, head_dim ** -0.5)
            assert [(g.shape, g.dtype) for g in grads] == [(x.shape, dtype) for x in (q, k, v)], case
            # The public primitive, with the backend named, reaches the same functions through the selection checks.
            out2, lse2 = block_attention(q, k, v, causal, backend=backend)
            assert (out2.shape, lse2.shape) == (out.shape, lse.shape), case
            grads2 = block_attention_backward(dout, q, k, v, out2, lse2, causal, backend=backend)
            assert [g.shape for g in grads2] == [x.shape for x in (q, k, v)], case


def _sequence_parallel_methods():
    return [name for name in available_methods() if get_method(name).attention is not None]


def test_every_schedule_is_covered():
    assert set(_sequence_parallel_methods()) == {
        "ring_attn", "zigzag_ring_attn", "stripe_attn", "dist_flash_attn", "ulysses_attn", "usp_attn"}


@pytest.mark.parametrize("backend,dtypes", META_BACKENDS)
@pytest.mark.parametrize("method_name", _sequence_parallel_methods())
def test_schedule_on_meta_at_world_size_1(method_name, backend, dtypes):
    method = get_method(method_name)
    docs = torch.tensor([0] * 20 + [1] * 30 + [2] * 14)
    for dtype in dtypes:
        for head_dim in (64, 128, 256):
            for heads, kv_heads in ((8, 8), (8, 2)):
                for causal in (True, False):
                    for doc_ids in ((None, docs) if method.documents else (None,)):
                        case = f"{method_name} {backend} {dtype} D={head_dim} H={heads}/{kv_heads} causal={causal}"
                        q = meta(1, heads, 64, head_dim, dtype=dtype).requires_grad_()
                        k, v = (meta(1, kv_heads, 64, head_dim, dtype=dtype).requires_grad_() for _ in range(2))
                        extra = {} if doc_ids is None else {"doc_ids": doc_ids}
                        out, lse = method.attention(q, k, v, causal=causal, scale=None, group=None, backend=backend,
                                                    **extra)
                        assert (out.shape, out.dtype, out.device.type) == (q.shape, dtype, "meta"), case
                        assert (lse.shape, lse.dtype) == ((1, heads, 64), torch.float32), case
                        out.backward(torch.empty_like(out))
                        for x in (q, k, v):
                            assert (x.grad.shape, x.grad.dtype) == (x.shape, dtype), case


@pytest.mark.parametrize("backend,dtypes", META_BACKENDS)
def test_dual_chunk_attention_on_meta(backend, dtypes):
    for dtype in dtypes:
        for head_dim in (64, 128, 256):
            for heads, kv_heads in ((8, 8), (8, 2)):
                inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
                q = meta(1, heads, 64, head_dim, dtype=dtype).requires_grad_()
                k, v = (meta(1, kv_heads, 64, head_dim, dtype=dtype).requires_grad_() for _ in range(2))
                out, lse = dual_chunk_attention(q, k, v, inv_freq, DCAConfig(32, 16, 4), backend=backend)
                assert (out.shape, out.dtype, lse.shape) == (q.shape, dtype, (1, heads, 64))
                out.backward(torch.empty_like(out))
                assert [x.grad.shape for x in (q, k, v)] == [x.shape for x in (q, k, v)]


# ----------------------------------------------------------------------------------------------------------------------
# Backend selection: device x dtype x head dim -> backend
# ----------------------------------------------------------------------------------------------------------------------
def _table(flash_attn_installed: bool):
    fast = "flash_attn" if flash_attn_installed else "torch_flash"
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in (64, 128, 256, 100, 512):
            rows.append(("cpu", dtype, head_dim, "torch_cpu"))
            rows.append(("meta", dtype, head_dim, "math"))
            flash_ok = dtype != torch.float32 and head_dim <= 256 and head_dim % 8 == 0
            rows.append(("cuda", dtype, head_dim, fast if flash_ok else "torch_cuda"))
            rows.append(("cuda:1", dtype, head_dim, fast if flash_ok else "torch_cuda"))
    return rows


@pytest.mark.parametrize("flash_attn_installed", [False, True], ids=["no-flash-attn", "flash-attn"])
def test_selection_table(monkeypatch, flash_attn_installed):
    module = object() if flash_attn_installed else None
    monkeypatch.setattr(kernels, "_flash_attn_module", lambda: module)
    for device, dtype, head_dim, expected in _table(flash_attn_installed):
        got = choose_backend(device, dtype, head_dim, capability=(9, 0) if device.startswith("cuda") else None)
        assert got == expected, f"{device} {dtype} D={head_dim}: {got}, expected {expected}"
        if device == "cuda" and head_dim == 128:  # a GPU older than sm80 gets memory-efficient attention
            assert choose_backend(device, dtype, head_dim, capability=(7, 5)) == "torch_cuda"
        if device == "cuda" and head_dim in (128, 256):  # sm86/sm89/sm120: flash backward only up to head dim 192
            for capability in ((8, 6), (8, 9), (12, 0)):
                want = "torch_cuda" if head_dim == 256 else expected
                assert choose_backend(device, dtype, head_dim, capability=capability) == want, capability


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA the capability is not read from a device")
def test_selection_without_a_device_assumes_a_flash_capable_gpu(monkeypatch):
    monkeypatch.setattr(kernels, "_flash_attn_module", lambda: None)
    assert choose_backend("cuda", torch.bfloat16, 128) == "torch_flash"
    assert choose_backend(torch.device("cuda", 0), torch.float32, 128) == "torch_cuda"


def test_select_backend_reads_the_tensor():
    assert select_backend(meta(1, 2, 8, 64, dtype=torch.bfloat16)) == "math"
    assert select_backend(torch.zeros(1, 2, 8, 64)) == "torch_cpu"
    assert select_backend(meta(1, 2, 8, 64, dtype=torch.bfloat16), "torch_flash") == "torch_flash"


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv("EASY_CONTEXT_ATTN_BACKEND", "torch_cuda")
    assert choose_backend("cuda", torch.bfloat16, 128) == "torch_cuda"
    monkeypatch.setenv("EASY_CONTEXT_ATTN_BACKEND", "torch_flash")
    assert choose_backend("cuda", torch.float16, 64) == "torch_flash"
    assert choose_backend("cuda", torch.float16, 64, backend="math") == "math"  # an explicit argument wins
    q = meta(1, 4, 16, 64, dtype=torch.bfloat16)
    out, lse = block_attention(q, q, q, True)  # the forced backend runs, on meta tensors
    assert out.shape == q.shape and lse.shape == (1, 4, 16)


@pytest.mark.parametrize("backend", ["torch_flash", "torch_cudnn"])
def test_forced_flash_kernels_refuse_what_they_cannot_run(monkeypatch, backend):
    if backend == "torch_cudnn" and not HAS_CUDNN_OP:
        pytest.skip(NO_CUDNN_OP)
    with pytest.raises(ValueError, match=rf"{backend}' needs float16 or bfloat16.*use backend 'torch_cuda'"):
        choose_backend("cuda", torch.float32, 128, backend)
    for head_dim in (512, 100):
        with pytest.raises(ValueError, match=rf"head dim <= 256 and a multiple of 8, got {head_dim}.*'torch_cuda'"):
            choose_backend("cuda", torch.bfloat16, head_dim, backend)
    with pytest.raises(ValueError, match="runs on CUDA tensors, got a CPU tensor: use backend 'torch_cpu'"):
        choose_backend("cpu", torch.bfloat16, 128, backend)
    monkeypatch.setenv("EASY_CONTEXT_ATTN_BACKEND", backend)
    q = meta(1, 4, 16, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="EASY_CONTEXT_ATTN_BACKEND"):
        block_attention(q, q, q, True)


def test_forced_torch_cuda_takes_every_dtype_and_head_dim():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in (64, 100, 512):
            assert choose_backend("cuda", dtype, head_dim, "torch_cuda") == "torch_cuda"
