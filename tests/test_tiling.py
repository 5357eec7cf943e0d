"""Memory beyond attention: the sequence-tiled MLP (easy_context.tiling) and the host offload of the checkpointed
layer inputs (easy_context.offload), on tiny Llama, Mistral and Qwen2 models with real autograd.

* The tiled MLP gives the plain model's loss and every parameter gradient (float32, relative 1e-6) under each
  activation-checkpointing mode and under zigzag ring attention on 2 gloo ranks; it really runs over tiles (the MLP
  sees no more than a tile of tokens, and keeps no sequence-long intermediate for backward).
* The offload gives bit-identical loss and gradients, and its hooks receive exactly the layer inputs.
"""

import pytest
import torch

from distributed import run_distributed, sharded_step
from reference import rel_err
from tiny_models import FAMILIES, tiny_batch, tiny_model

from easy_context import enable_checkpoint_offload, enable_tiled_mlp
from easy_context.offload import checkpoint_offload, disable_checkpoint_offload
from easy_context.tiling import default_tile_size, disable_tiled_mlp, tiled_mlp_modules
from easy_context.training.model import CHECKPOINTING, enable_checkpointing

TOL = 1e-6
SEQ_LEN = 96
TILE = 40  # tiles of 40, 40 and 16 tokens


def _step(family, mode="none", tile=None, offload=False, seq_len=SEQ_LEN, **extra):
    model = tiny_model(family, **extra).train()
    enable_checkpointing(model, mode, tiled_mlp=tile, offload=offload)
    input_ids, position_ids, target_ids = tiny_batch(seq_len, masked_prefix=5)
    logits = model(input_ids, position_ids=position_ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), ignore_index=-100)
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _max_errors(got, ref):
    (_, loss, grads), (_, ref_loss, ref_grads) = got, ref
    assert grads.keys() == ref_grads.keys() and all(g is not None for g in grads.values())
    return rel_err(loss, ref_loss), max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)


@pytest.mark.parametrize("mode", CHECKPOINTING)
@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_mlp_gives_the_plain_loss_and_gradients(family, mode):
    loss_err, grad_err = _max_errors(_step(family, mode, tile=TILE), _step(family, mode))
    assert loss_err <= TOL and grad_err <= TOL, (family, mode, loss_err, grad_err)


def test_tiled_mlp_runs_over_tiles_and_keeps_no_sequence_long_intermediate():
    """Every MLP call (forward, recomputation in backward) sees at most a tile of tokens, and what the forward pass
    saves for backward holds no intermediate-sized tensor: only the plain model keeps ``tokens × F`` ones."""
    f = 192  # intermediate_size, a width no other tensor of the model has

    def run(tile):
        model = tiny_model("llama", intermediate_size=f).train()
        if tile:
            enable_tiled_mlp(model, tile)
        rows, saved = [], []
        for mlp in tiled_mlp_modules(model):
            mlp.gate_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
        input_ids, position_ids, _ = tiny_batch(SEQ_LEN)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            loss = model(input_ids, position_ids=position_ids).logits.float().logsumexp(-1).mean()
        forward_calls = len(rows)
        loss.backward()
        return rows, forward_calls, [s for s in saved if s[-1] == f]

    rows, forward_calls, intermediates = run(TILE)
    assert rows == [40, 40, 16] * 4 and forward_calls == 6  # 2 layers: 3 tiles forward, 3 tiles in backward each
    assert intermediates == []
    rows, forward_calls, intermediates = run(None)
    assert rows == [SEQ_LEN] * 2 and len(intermediates) >= 2 * 3  # gate, up, product... of length SEQ_LEN


def test_tiled_mlp_default_tile_is_the_hidden_size_and_shorter_inputs_run_plain():
    model = tiny_model("qwen2", hidden_size=64)
    enable_tiled_mlp(model)
    assert default_tile_size(64) == 64
    assert all(mlp.__dict__["_easy_context_tile_size"] == 64 for mlp in tiled_mlp_modules(model))
    x = torch.randn(2, 64, 64)
    mlp = tiled_mlp_modules(model)[0]
    assert torch.equal(mlp(x), mlp.__dict__["_easy_context_untiled_forward"](x))  # one tile: the plain MLP
    disable_tiled_mlp(model)
    assert "forward" not in mlp.__dict__ and model.state_dict().keys() == tiny_model("qwen2").state_dict().keys()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_tiled_mlp_rejects_a_bad_tile_size_in_one_line(bad):
    with pytest.raises(ValueError) as err:
        enable_tiled_mlp(tiny_model("llama"), bad)
    message = str(err.value)
    assert "\n" not in message and "integer >= 1" in message and repr(bad) in message


def test_tiled_mlp_needs_decoder_mlps():
    with pytest.raises(ValueError, match="no decoder layer with an `mlp`"):
        enable_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def _zigzag_tiled_full_checkpointing(rank, world_size):
    import easy_context as ec

    model = tiny_model("llama").train()
    ec.apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)
    enable_checkpointing(model, "full", tiled_mlp=16, offload=True)  # 48 local tokens: 3 tiles
    input_ids, position_ids, target_ids = tiny_batch(SEQ_LEN, masked_prefix=5)
    loss, _, grads = sharded_step(model, "zigzag_ring_attn", input_ids, position_ids, target_ids, rank, world_size)
    return loss, grads


def test_tiled_mlp_and_offload_under_zigzag_ring_attention_on_two_ranks():
    loss, grads = run_distributed(_zigzag_tiled_full_checkpointing, 2)[0]
    _, ref_loss, ref_grads = _step("llama")
    assert rel_err(loss, ref_loss) <= TOL
    errors = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    # the sequence-parallel schedule itself is exact to the project's 1e-5; the tiling adds nothing measurable
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("mode", ["full", "remat"])
def test_offload_is_bit_exact_and_its_hooks_get_the_layer_inputs(mode):
    model, loss, grads = _step("llama", mode, offload=True)
    _, ref_loss, ref_grads = _step("llama", mode)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    offload = checkpoint_offload(model)
    layers = model.config.num_hidden_layers
    assert offload.saved_tensors == layers  # one per layer: its hidden-state input, nothing from inside it
    assert offload.saved_bytes == layers * 2 * SEQ_LEN * model.config.hidden_size * 4  # batch 2, float32
    assert offload.copied_bytes == 0  # CPU tensors are already in host memory

    inputs, packed = [], []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    pack = offload.pack
    offload.pack = lambda t: packed.append(t) or pack(t)
    enable_checkpoint_offload(model)  # again: the same hooks, not a second layer of them
    assert checkpoint_offload(model) is offload
    input_ids, position_ids, _ = tiny_batch(SEQ_LEN)
    model(input_ids, position_ids=position_ids)
    assert len(packed) == layers and all(p is i for p, i in zip(packed, inputs))
    disable_checkpoint_offload(model)
    assert checkpoint_offload(model) is None


def test_offload_and_tiling_together_under_full_checkpointing():
    loss_err, grad_err = _max_errors(_step("mistral", "full", tile=TILE, offload=True), _step("mistral"))
    assert loss_err <= TOL and grad_err <= TOL


def test_offload_needs_checkpointing():
    with pytest.raises(ValueError, match="use --checkpointing full or remat"):
        enable_checkpointing(tiny_model("llama"), "none", offload=True)
    with pytest.raises(ValueError, match="turn on activation checkpointing first"):
        enable_checkpoint_offload(tiny_model("llama"))
