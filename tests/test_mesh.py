"""The (data × sequence) mesh, prepare_dataloader and one accelerate optimizer step (DDP; DeepSpeed ZeRO-2 as a slow
test) on 4 gloo ranks as 2 dp × 2 sp.

One set of 4 processes (a module fixture) builds the mesh, reads the data, takes a training step and provokes the
configuration errors; the tests below check what each rank reported against single-process references.
"""

import os

import pytest
import torch

from distributed import run_distributed
from reference import FP32_TOL, rel_err
from tiny_models import tiny_batch, tiny_model

WORLD, SP = 4, 2
METHOD = "usp_attn"  # zigzag layout; with sp=2 and 2 KV heads it runs Ulysses over both ranks
NUM_SAMPLES, BATCH, SEQ_LEN = 16, 2, 32
LR = 0.5


def _samples(loader):
    return [batch[0].tolist() for batch in loader]


def _training_batch():
    """The global batch: NUM_SAMPLES sequences of SEQ_LEN+1 tokens, with different numbers of masked targets."""
    ids, _, _ = tiny_batch(SEQ_LEN + 1, batch=NUM_SAMPLES, seed=3)
    return ids


def _inputs(sequences, sample_ids):
    input_ids, target_ids = sequences[:, :-1].clone(), sequences[:, 1:].clone()
    for row, sample in enumerate(sample_ids.tolist()):
        target_ids[row, : 3 * sample] = -100  # sample i has 3i masked targets
    position_ids = torch.arange(SEQ_LEN).expand_as(input_ids)
    return input_ids, position_ids, target_ids


def _optimizer_step(accelerator):
    """One SGD step on this replica's first batch with the global token-weighted loss; gradients are averaged over
    all processes by ``accelerator`` (DDP or DeepSpeed). Returns ``(sample ids, loss, parameters)``."""
    from torch.utils.data import DataLoader, TensorDataset

    import easy_context as ec
    from easy_context import mesh as M

    model = tiny_model("llama")
    ec.apply_seq_parallel_monkey_patch(METHOD, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    # prepare_dataloader first: it resolves DeepSpeed's "auto" micro-batch size, which accelerator.prepare needs
    loader = ec.prepare_dataloader(METHOD, DataLoader(TensorDataset(torch.arange(NUM_SAMPLES)), batch_size=BATCH),
                                   accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    (sample_ids,) = next(iter(loader))
    sp_rank, sp_size = M.sequence_parallel_rank_and_size()
    local = ec.prepare_seq_parallel_inputs(METHOD, *_inputs(_training_batch()[sample_ids], sample_ids), sp_rank,
                                           sp_size, accelerator.device)
    logits = model(local["local_input_ids"], position_ids=local["local_position_ids"]).logits
    loss = ec.seq_parallel_cross_entropy(logits, local["local_target_ids"])
    accelerator.backward(loss)
    optimizer.step()
    params = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    return sample_ids.tolist(), loss.detach(), params


def _worker(rank, world_size):
    os.environ["OMP_NUM_THREADS"] = "1"
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.data import DataLoader, TensorDataset

    import easy_context as ec
    from easy_context import mesh as M

    report = {}
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    errors = {}
    try:
        M.setup_mesh(sp_size=3)
    except ValueError as err:
        errors["sp_size"] = str(err)

    mesh = M.setup_mesh(sp_size=SP)
    report["mesh"] = (tuple(mesh.shape), mesh.mesh_dim_names)
    report["ranks"] = dict(sp=M.sequence_parallel_rank_and_size(), dp=(M.data_parallel_rank(), M.data_parallel_size()),
                           sp_group=torch.distributed.get_process_group_ranks(M.get_sequence_parallel_group()),
                           dp_group=torch.distributed.get_process_group_ranks(M.get_data_parallel_group()))

    dataset = TensorDataset(torch.arange(NUM_SAMPLES))
    # In order: the exact batches each replica reads are known.
    report["sequential"] = _samples(ec.prepare_dataloader(METHOD, DataLoader(dataset, batch_size=BATCH), accelerator))
    # Shuffled: same order within a group, disjoint across groups; resuming from step 3 continues the order.
    shuffled = ec.prepare_dataloader(METHOD, DataLoader(dataset, batch_size=BATCH, shuffle=True), accelerator,
                                     sp_size=SP)
    shuffled.set_epoch(1)
    report["epoch1"] = _samples(shuffled)
    resumed = accelerator.skip_first_batches(shuffled, 3)
    resumed.set_epoch(1)
    report["epoch1_from_3"] = _samples(resumed)

    # Accelerate's default (RNG-synchronised, not seedable) sampler, over the mesh and over one world-wide group.
    plain = Accelerator(cpu=True)
    report["plain_shuffle"] = _samples(
        ec.prepare_dataloader(METHOD, DataLoader(dataset, batch_size=BATCH, shuffle=True), plain))
    M.set_sequence_parallel_group(None)  # one sequence-parallel group of 4: a single replica
    report["single_replica_shuffle"] = _samples(
        ec.prepare_dataloader(METHOD, DataLoader(dataset, batch_size=BATCH, shuffle=True), plain))
    M.setup_mesh(sp_size=SP)

    for name, call in {
        "sp_size_vs_mesh": lambda: ec.prepare_dataloader(METHOD, DataLoader(dataset), accelerator, sp_size=4),
        "mesh_names": lambda: ec.prepare_dataloader(
            METHOD, DataLoader(dataset), accelerator, mesh=init_device_mesh("cpu", (WORLD,), mesh_dim_names=("sp",))),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    report["errors"] = errors

    report["step_samples"], report["loss"], report["params"] = _optimizer_step(accelerator)
    return report


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_worker, WORLD, timeout=240)


def test_mesh_groups(reports):
    for rank, r in enumerate(reports):
        assert r["mesh"] == ((WORLD // SP, SP), ("dp", "sp"))
        assert r["ranks"]["sp"] == (rank % SP, SP)
        assert r["ranks"]["dp"] == (rank // SP, WORLD // SP)
        assert r["ranks"]["sp_group"] == [rank - rank % SP + i for i in range(SP)]  # consecutive ranks
        assert r["ranks"]["dp_group"] == list(range(rank % SP, WORLD, SP))


def test_each_rank_sees_its_replicas_batches(reports):
    batches = [list(range(i, i + BATCH)) for i in range(0, NUM_SAMPLES, BATCH)]
    for rank, r in enumerate(reports):
        dp_rank = rank // SP
        assert r["sequential"] == batches[dp_rank::WORLD // SP]


def test_shuffled_groups_share_order_and_are_disjoint(reports):
    epoch = [r["epoch1"] for r in reports]
    assert epoch[0] == epoch[1] and epoch[2] == epoch[3]  # same samples, same order inside an sp group
    group0 = {s for batch in epoch[0] for s in batch}
    group1 = {s for batch in epoch[2] for s in batch}
    assert not group0 & group1 and group0 | group1 == set(range(NUM_SAMPLES))
    order = [s for batch in epoch[0] for s in batch]
    assert order != sorted(order)  # really shuffled: 8 samples come out sorted with probability 1/8! = 2.5e-5
    for r in reports:
        assert r["epoch1_from_3"] == r["epoch1"][3:]


def test_default_sampler_shuffles_alike_within_groups(reports):
    plain = [r["plain_shuffle"] for r in reports]
    assert plain[0] == plain[1] and plain[2] == plain[3]
    assert not {s for b in plain[0] for s in b} & {s for b in plain[2] for s in b}
    single = [r["single_replica_shuffle"] for r in reports]
    assert all(order == single[0] for order in single)  # one replica: every rank reads the whole shuffled epoch
    assert sorted(s for b in single[0] for s in b) == list(range(NUM_SAMPLES)) != [s for b in single[0] for s in b]


def test_configuration_errors(reports):
    errors = reports[0]["errors"]
    assert "sp_size=3 does not divide the world size 4: choose one of 1, 2, 4" in errors["sp_size"]
    assert "sp_size=4 does not match the device mesh, whose 'sp' dimension has size 2" in errors["sp_size_vs_mesh"]
    assert "mesh_dim_names=('dp', 'sp')" in errors["mesh_names"]


def test_setup_mesh_needs_a_process_group():
    from easy_context import mesh as M

    with pytest.raises(RuntimeError, match="init_process_group"):
        M.setup_mesh(sp_size=1)


def _check_step_against_single_process(reports):
    # dp replica d read batch d: the global batch is the first WORLD // SP batches
    assert [r["step_samples"] for r in reports] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    sample_ids = torch.arange(BATCH * WORLD // SP)
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    input_ids, position_ids, target_ids = _inputs(_training_batch()[sample_ids], sample_ids)
    logits = model(input_ids, position_ids=position_ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), ignore_index=-100)
    loss.backward()
    optimizer.step()
    for r in reports:
        assert rel_err(r["loss"], loss) <= FP32_TOL
        for name, p in model.named_parameters():
            update_err = rel_err(r["params"][name] - before[name], p.detach() - before[name])
            assert update_err <= FP32_TOL, f"{name}: update relative error {update_err:.2e}"


def test_one_optimizer_step_equals_single_process(reports):
    _check_step_against_single_process(reports)


def _deepspeed_worker(rank, world_size):
    os.environ["OMP_NUM_THREADS"] = "1"
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from easy_context import mesh as M

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 0.0}  # plain SGD: no clipping
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert accelerator.distributed_type == "DEEPSPEED", accelerator.distributed_type
    M.setup_mesh(sp_size=SP)
    step_samples, loss, params = _optimizer_step(accelerator)
    return {"step_samples": step_samples, "loss": loss, "params": params}


@pytest.mark.slow
def test_one_deepspeed_zero2_step_equals_single_process():
    pytest.importorskip("deepspeed")
    _check_step_against_single_process(run_distributed(_deepspeed_worker, WORLD, timeout=400))
