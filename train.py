"""Long-context training of a HuggingFace causal LM with exact sequence-parallel attention.

    accelerate launch --config_file accelerate_configs/single_node.yaml train.py \\
        --model meta-llama/Llama-2-7b-hf --seq-length 32768 --rope-theta 1e6 --parallel-mode zigzag_ring_attn

On CPU (2 gloo processes): ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train.py ...``
or ``accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train.py ...``. See docs/training.md.

Reads top to bottom: options, processes, data, model, optimizer, resume, the loop, the final save. The machinery
lives in easy_context/training/.
"""

import datetime
import json
import os
import time

import torch

import easy_context as ec
from easy_context import cli
from easy_context import training as T
from easy_context.cli import float_range, int_range
from easy_context.loss import global_sum

# ---------------------------------------------------------------------------------------------------- options
parser = cli.Parser(description=__doc__.split("\n")[0], epilog="Options also take underscores (--parallel_mode); "
                    "the names shared by every script are in docs/cli.md.")
parser.add_argument("--model", default="tiny", help="'tiny' (a 2-layer Llama), 'smollm2', or a folder/hub name")
parser.add_argument("--num-layers", type=int_range(1), default=None, help="keep only the first N decoder layers")
parser.add_argument("--tokenizer", default=None, help="unset: the model's own (SmolLM2's for 'tiny')")
parser.add_argument("--dataset", default="austen", help="'austen', a .txt/.jsonl/.arrow/.parquet path, or a HF name")
parser.add_argument("--text-field", default="text", help="the text field of .jsonl and datasets sources")
parser.add_argument("--no-pack", action="store_true", help="one document per sample (padded) instead of packing")
parser.add_argument("--reset-position-ids", action="store_true", help="positions restart at each document start "
                    "and attention is masked across documents (data_parallel only)")
parser.add_argument("--seq-length", type=int_range(1), default=2048, help="tokens per training sequence")
parser.add_argument("--pad-to-multiple", action="store_true", help="pad samples to the length the method needs")
parser.add_argument("--parallel-mode", default="zigzag_ring_attn", choices=ec.available_methods())
parser.add_argument("--sp-size", type=int_range(1), default=None, help="sequence-parallel group size (none: all)")
parser.add_argument("--rope-theta", type=float_range(0, lo_open=True), default=None, help="new RoPE base")
parser.add_argument("--batch-size", type=int_range(1), default=1, help="sequences per replica per micro-step")
parser.add_argument("--grad-accum", "--gradient-accumulate-every", type=int_range(1), default=1,
                    help="micro-steps per optimizer step")
parser.add_argument("--learning-rate", "--lr", type=float_range(0), default=2e-5)
parser.add_argument("--warmup-steps", type=int_range(0), default=0)
parser.add_argument("--weight-decay", type=float_range(0), default=0.0)
parser.add_argument("--max-grad-norm", type=float_range(0), default=1.0, help="gradient clipping; 0: none")
parser.add_argument("--steps", "--max-train-steps", type=int_range(1), default=100, help="optimizer steps")
parser.add_argument("--seed", type=int_range(0), default=0)
parser.add_argument("--loss-chunk-size", type=T.loss_chunk_size_arg, default=4096, help="tokens per chunk, or auto")
parser.add_argument("--checkpointing", choices=T.CHECKPOINTING, default="full", help="activation checkpointing: "
                    "whole layers, 'remat' (recompute up to the attention output), or none")
parser.add_argument("--tiled-mlp", nargs="?", const="auto", type=T.tile_size_arg, metavar="N", help="N-token MLP tiles")
parser.add_argument("--offload-checkpoints", action="store_true", help="checkpointed layer inputs in host memory")
parser.add_argument("--output-dir", default="outputs/run", help="checkpoints, log.jsonl and the final model; "
                    "locked while the run lasts")
parser.add_argument("--save-every", "--checkpointing-steps", type=int_range(0), default=0, help="checkpoint every "
                    "N steps (0: only at --stop-at)")
parser.add_argument("--keep-checkpoints", type=int_range(1), default=2, help="newest checkpoints of this run kept")
parser.add_argument("--resume", "--resume-from-checkpoint", nargs="?", const="", default=None, metavar="PATH",
                    help="continue a run: its output folder (newest intact checkpoint) or a checkpoint-<step> "
                    "folder; alone: --output-dir")
parser.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a "
                    "previous run, moving it into <output-dir>/previous/<time>/ (nothing is deleted)")
parser.add_argument("--stop-at", type=int_range(1), default=None, help="stop after this step, as if interrupted")
parser.add_argument("--dist-timeout", type=float_range(0, lo_open=True), default=cli.DEFAULT_DIST_TIMEOUT,
                    metavar="SECONDS", help="how long a process waits for the others before the run stops")
parser.add_argument("--wandb", default=None, metavar="PROJECT", help="log to Weights & Biases")
parser.add_argument("--tensorboard", action="store_true", help="log to TensorBoard under --output-dir")
args = parser.parse_args()
args.resume = args.output_dir if args.resume == "" else args.resume
cli.install_error_handler("train.py", dist_timeout=args.dist_timeout, cleanup=T.release_locks)

# ---------------------------------------------------------------------------------------------------- processes
from accelerate import Accelerator  # noqa: E402 - imported after the options: a wrong option fails in a second
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer, get_constant_schedule_with_warmup  # noqa: E402

trackers = (["wandb"] if args.wandb else []) + (["tensorboard"] if args.tensorboard else [])
# On CPU, accelerate needs the gloo backend named, or it sees one process (a plain `python train.py` needs none).
launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
accelerator = Accelerator(
    cpu=not (torch.cuda.is_available() or deepspeed), gradient_accumulation_steps=args.grad_accum,
    log_with=trackers or None, project_dir=args.output_dir,
    kwargs_handlers=[InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo",
                                            timeout=datetime.timedelta(seconds=args.dist_timeout))] * launched)
with cli.user_errors():  # every option error is reported before anything heavy runs
    sp_size = T.check_parallel_options(args.parallel_mode, accelerator.num_processes, args.sp_size,
                                       args.seq_length, args.pad_to_multiple, args.reset_position_ids)
    run = T.start_run(accelerator, args.output_dir, resume=args.resume, overwrite=args.overwrite)  # the lock
    T.check_dataset(args.dataset)
dp_rank, dp_size, sp_rank = T.setup_sequence_parallel(args.parallel_mode, sp_size, timeout=args.dist_timeout)
set_seed(args.seed)
if accelerator.is_main_process:
    print(f"{accelerator.num_processes} processes = {dp_size} data-parallel x {sp_size} sequence-parallel "
          f"({args.parallel_mode}), {accelerator.distributed_type.value} on {accelerator.device}", flush=True)

# ---------------------------------------------------------------------------------------------------- data
model_dir = T.model_path(args.model) if args.model != "tiny" else None
tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir or T.model_path("smollm2"))
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
with cli.user_errors():  # text is tokenized once into a cache on disk; a step reads its samples from disk
    data = T.open_samples(args.dataset, tokenizer, args.seq_length, pad_id, text_field=args.text_field,
                          pack=not args.no_pack, reset_position_ids=args.reset_position_ids)
num_samples, global_batch = len(data["input_ids"]), args.batch_size * dp_size * args.grad_accum
if accelerator.is_main_process:
    print(f"data: {num_samples} samples of {args.seq_length} tokens from {args.dataset}; "
          f"{global_batch} samples per step", flush=True)
T.warn_padding(data, num_samples, args.seq_length, args.parallel_mode, sp_size, args.pad_to_multiple)
zero3 = accelerator.distributed_type == DistributedType.DEEPSPEED and \
    accelerator.state.deepspeed_plugin.zero_stage == 3
signature = T.run_signature(args, accelerator, dp_size, sp_size, data)  # what a resume must keep
if args.resume is not None:  # verified and compared with these options before anything heavy runs
    resume_folder, resume_step = T.check_resume(accelerator, run, args.resume, signature, args)

# ---------------------------------------------------------------------------------------------------- model
model = T.build_model(args.model, vocab_size=len(tokenizer), seq_length=args.seq_length, rope_theta=args.rope_theta,
                      num_layers=args.num_layers, seed=args.seed)
ec.apply_seq_parallel_monkey_patch(args.parallel_mode, model)
T.enable_checkpointing(model, args.checkpointing, tiled_mlp=args.tiled_mlp, offload=args.offload_checkpoints)
wrapped = T.ChunkedLossModel(model, args.loss_chunk_size, zero3=zero3).train()

# ---------------------------------------------------------------------------------------------------- optimizer
optimizer = T.build_optimizer(wrapped.parameters(), args.learning_rate, args.weight_decay, accelerator)
scheduler = get_constant_schedule_with_warmup(optimizer, args.warmup_steps)
if accelerator.distributed_type == DistributedType.DEEPSPEED:
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=args.batch_size, gradient_clipping=args.max_grad_norm)
wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
accelerator.register_for_checkpointing(scheduler)  # stepped here once per optimizer step, saved with the state
if trackers:
    accelerator.init_trackers(args.wandb or "easy-context", config=vars(args))

# ---------------------------------------------------------------------------------------------------- resume
start_step = 0
if args.resume is not None:  # also cuts log.jsonl back to the checkpoint's step
    start_step = T.load_resume(accelerator, run, resume_folder, resume_step)
    accelerator.print(f"resumed from {resume_folder} at step {start_step}")

# ---------------------------------------------------------------------------------------------------- training
log_path = os.path.join(args.output_dir, "log.jsonl")
progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
                disable=not accelerator.is_main_process, desc="train")
for step in progress:
    t0 = time.perf_counter()
    T.reset_peak_memory(accelerator.device)
    # The whole step's samples are known up front, so every micro-step divides by the step's valid-target count:
    # the accumulated gradient is exactly that of the global token mean.
    batch = T.global_batch_indices(step, num_samples, global_batch, args.seed)
    step_count = (data["target_ids"][batch] != -100).sum()
    step_loss, lr = 0.0, scheduler.get_last_lr()[0]
    for micro in range(args.grad_accum):
        rows = batch[(micro * dp_size + dp_rank) * args.batch_size:][:args.batch_size]
        local = ec.prepare_seq_parallel_inputs(
            args.parallel_mode, data["input_ids"][rows], data["position_ids"][rows], data["target_ids"][rows],
            sp_rank, sp_size, accelerator.device, pad=args.pad_to_multiple, pad_token_id=pad_id)
        with accelerator.accumulate(wrapped):
            loss_sum, _ = wrapped(local["local_input_ids"], local["local_position_ids"], local["local_target_ids"])
            # Sum over every process (sequence shards and data-parallel groups) over the step's count; backward
            # of the sum all-reduces, and DDP/DeepSpeed average the gradients (see easy_context/loss.py).
            loss = global_sum(loss_sum) / step_count.to(loss_sum.device, torch.float32)
            accelerator.backward(loss * args.grad_accum)  # accelerate/DeepSpeed divide by grad_accum again
            if accelerator.sync_gradients and accelerator.distributed_type != DistributedType.DEEPSPEED \
                    and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        step_loss += loss.item()
    scheduler.step()

    # ------------------------------------------------------------------------------------------------ logging
    seconds = time.perf_counter() - t0
    stats = {"step": step + 1, "loss": step_loss, "lr": lr,
             "tokens_per_s": global_batch * args.seq_length / seconds,
             "peak_mem_gb": T.peak_memory_bytes(accelerator.device) / 2**30, "seconds": seconds}
    progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}",
                         mem=f"{stats['peak_mem_gb']:.2f}GB")
    if accelerator.is_main_process:
        with open(log_path, "a") as f:
            f.write(json.dumps(stats) + "\n")
    accelerator.log(stats, step=step + 1)

    # ------------------------------------------------------------------------------------------------ checkpoints
    if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.stop_at:
        path = T.save_checkpoint(accelerator, args.output_dir, step + 1, {"data_position": (step + 1) * global_batch,
                                 "args": vars(args), "run": signature}, args.keep_checkpoints, run.run_id)
        accelerator.print(f"checkpoint saved to {path}")
    if step + 1 == args.stop_at:
        break

# ---------------------------------------------------------------------------------------------------- final model
if args.stop_at is None or args.stop_at >= args.steps:
    T.save_final_model(accelerator, wrapped, tokenizer, args.output_dir)
    accelerator.print(f"model saved to {os.path.abspath(args.output_dir)} (rope_theta={T.get_rope_theta(model.config)}"
                      f", max_position_embeddings={model.config.max_position_embeddings})")
accelerator.end_training()
