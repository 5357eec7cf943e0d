"""Shared machinery of ``eval_ppl.py`` and ``eval_needle.py``: long-context evaluation of (patched) causal LMs.

The scripts stay thin; everything they share lives here:

* **Model specs.** ``[PATH][@METHOD[:KEY=VALUE,...]]`` names a model and the attention method attached to it
  (:func:`parse_model_spec`); :func:`load_model` loads and patches it.
* **Processes.** :func:`init_runtime` joins the process group that ``accelerate launch`` or ``torchrun`` set up (gloo
  on CPU, NCCL on GPUs), or runs a single process. A *sequence-parallel* method shards every sequence over all
  processes; any other model (plain or DCA) gets whole sequences, spread over the processes.
* **Perplexity.** :func:`local_nll` computes this rank's NLL sum and token count from the decoder's hidden states in
  chunks (no ``tokens × vocab`` logits); the callers all-reduce sums and counts, so the perplexity is the
  token-weighted mean over every token of every sample, exactly as one process computes it.
* **Needle in a haystack.** :class:`Haystack` builds prompts of a target token length with the needle inserted at a
  sentence boundary found in the text; :func:`forced_answer_predictions` scores by teacher forcing (sequence-parallel
  prefill), :func:`generate_answer` by greedy decoding with a KV cache.
* **Plots.** :func:`plot_perplexity` and :func:`plot_needle_heatmaps`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .cli import UserError
from .comm import all_reduce_sum
from .data import prepare_seq_parallel_inputs
from .loss import chunked_cross_entropy_sum
from .methods import get_method

__all__ = [
    "PLAIN",
    "ModelSpec",
    "parse_model_spec",
    "add_common_options",
    "check_lengths",
    "Runtime",
    "init_runtime",
    "shutdown_runtime",
    "resolve_dtype",
    "load_model",
    "load_config",
    "load_tokenizer",
    "file_sha256",
    "config_fingerprint",
    "weights_fingerprint",
    "tokenizer_fingerprint",
    "tokens_fingerprint",
    "model_identity",
    "result_key",
    "unique_labels",
    "TokenSamples",
    "PplResults",
    "token_lengths",
    "read_text_folder",
    "load_token_samples",
    "local_nll",
    "perplexity_by_length",
    "read_ppl_csv",
    "write_ppl_csv",
    "plot_perplexity",
    "NeedleConfig",
    "NeedleTrial",
    "Haystack",
    "forced_answer_predictions",
    "generate_answer",
    "read_trials",
    "needle_accuracy_grid",
    "plot_needle_heatmaps",
]

#: Method names that mean "the model's own attention".
PLAIN = ("plain", "none", "")


# ---------------------------------------------------------------------------------------------------------------
# Model specs
# ---------------------------------------------------------------------------------------------------------------


def _parse_value(text: str):
    """``"8192"`` -> 8192, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelSpec:
    """A model folder (or hub id) and the attention method to evaluate it with.

    ``method`` is ``None`` for the model's own attention; ``options`` go to
    :func:`easy_context.apply_seq_parallel_monkey_patch` (for example ``pretraining_length`` for ``"dca"``).
    """

    path: str
    method: Optional[str] = None
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short name for tables and legends: ``<folder name>[@method[:k=v,...]]``."""
        name = Path(self.path.rstrip("/")).name or self.path
        if self.method is None:
            return name
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{name}@{self.method}" + (f":{opts}" if opts else "")

    @property
    def sequence_parallel(self) -> bool:
        """Whether the method shards one sequence over the processes (else each process takes whole sequences)."""
        return self.method is not None and get_method(self.method).is_sequence_parallel


def parse_model_spec(text: str, default_path: Optional[str] = None) -> ModelSpec:
    """Parse ``[PATH][@METHOD[:KEY=VALUE,KEY=VALUE...]]``.

    Examples: ``/models/llama`` (plain), ``/models/llama@zigzag_ring_attn``,
    ``@dca:pretraining_length=8192,chunk_size=6144`` (the default model with DCA), ``@plain``. The path is split off
    at the *last* ``@``; an empty path means ``default_path``. Values are read as int, float, bool or string.
    Unknown methods raise ``ValueError`` listing the registered ones.
    """
    path, sep, rest = text.rpartition("@")
    if not sep:
        path, rest = text, ""
    path = path or (str(default_path) if default_path is not None else "")
    if not path:
        raise ValueError(f"model spec {text!r} names no model path and there is no default model")
    method_name, _, opt_text = rest.partition(":")
    method_name = method_name.strip()
    options: Dict[str, object] = {}
    for item in filter(None, (s.strip() for s in opt_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"model spec {text!r}: option {item!r} is not KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    if method_name.lower() in PLAIN or method_name == "data_parallel":
        if options:
            raise ValueError(f"model spec {text!r}: the plain model takes no options, got {sorted(options)}")
        return ModelSpec(path=path)
    method = get_method(method_name)  # raises for unknown names
    return ModelSpec(path=path, method=method.name, options=options)


def add_common_options(parser, *, min_tokens: int, max_tokens: int, tokens_step: int) -> None:
    """The options ``eval_ppl.py`` and ``eval_needle.py`` share, under one name each (docs/cli.md), with
    EasyContext's spellings as aliases."""
    from .cli import DEFAULT_DIST_TIMEOUT, float_range, int_range

    parser.add_argument("-m", "--model", action="append", dest="models", metavar="SPEC",
                        help="model spec [PATH][@METHOD[:KEY=VALUE,...]], repeatable; METHOD is plain (default), a "
                        "sequence-parallel method (zigzag_ring_attn, ring_attn, ...) or dca with its options, e.g. "
                        "@dca:pretraining_length=8192. Unset: the embedded SmolLM2-135M, plain")
    parser.add_argument("--min-tokens", "--min-context-length", type=int_range(2), default=min_tokens,
                        help="shortest context length")
    parser.add_argument("--max-tokens", "--max-context-length", type=int_range(2), default=max_tokens,
                        help="longest context length")
    parser.add_argument("--tokens-step", "--context-interval", type=int_range(1), default=tokens_step,
                        help="length step")
    parser.add_argument("--lengths", type=int_range(2), nargs="+", help="explicit lengths (overrides min/max/step)")
    parser.add_argument("--samples", "--num-samples", type=int_range(1), default=1,
                        help="sequences (perplexity) or trials (needle) per length")
    parser.add_argument("--rope-theta", type=float_range(0, lo_open=True), default=None,
                        help="RoPE base given to every model (unset: each model's own)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--dist-timeout", type=float_range(0, lo_open=True), default=DEFAULT_DIST_TIMEOUT,
                        metavar="SECONDS", help="how long a process waits for the others before the run stops")


def check_lengths(args) -> List[int]:
    """The lengths of ``args`` (see :func:`token_lengths`), or a :class:`UserError` naming the options."""
    try:
        return token_lengths(args.min_tokens, args.max_tokens, args.tokens_step, args.lengths)
    except ValueError:
        raise UserError(f"--min-tokens {args.min_tokens} is above --max-tokens {args.max_tokens}: swap them, or "
                        "pass --lengths") from None


# ---------------------------------------------------------------------------------------------------------------
# Processes and loading
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process stands: rank and size of the (global) process group and the device to compute on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_runtime(cpu: Optional[bool] = None, timeout: Optional[float] = None) -> Runtime:
    """Join the process group set up by ``accelerate launch`` / ``torchrun`` (from ``WORLD_SIZE``, ``RANK``...).

    One process (no launcher) needs no process group. On CPU (no CUDA, ``--cpu`` or ``ACCELERATE_USE_CPU=true``) the
    backend is gloo, on GPUs NCCL with one device per local rank. ``timeout`` (seconds, ``--dist-timeout``) bounds
    every wait for the other processes; a stalled or dead process then ends the run instead of hanging it.
    """
    if cpu is None:
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        import datetime

        kwargs = {"timeout": datetime.timedelta(seconds=timeout)} if timeout is not None else {}
        dist.init_process_group(backend="gloo" if cpu else "nccl", **kwargs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Runtime(rank=rank, world_size=world_size, device=device)


def shutdown_runtime(wait: bool = True) -> None:
    """Leave the process group (gloo processes often abort at exit without it).

    ``wait`` first waits for every rank; pass ``False`` on an error, when other ranks may never get there.
    """
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 matrix products are very slow on most CPUs) and bfloat16 on GPUs."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}: choose auto, {', '.join(dtypes)}")
    return dtypes[name]


def _load_error(path: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load the model {path!r} ({first[:300]}): pass a folder holding a HuggingFace model "
                     "(config.json and weights), a hub name, or leave PATH empty for the embedded SmolLM2-135M")


def load_config(spec: ModelSpec, rope_theta: Optional[float] = None):
    """The model's config, with ``rope_theta`` (``--rope-theta``) as its RoPE base when given."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.path)
    except (OSError, ValueError) as err:
        raise _load_error(spec.path, err) from None
    if rope_theta is not None:
        from .training import set_rope_theta

        set_rope_theta(config, rope_theta)
    return config


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError) as err:
        raise _load_error(spec.path, err) from None


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype = torch.float32,
               rope_theta: Optional[float] = None):
    """Load ``spec.path`` as ``(model, tokenizer)`` in eval mode on ``device``, patched with ``spec.method``;
    ``rope_theta`` replaces the RoPE base of the config (EasyContext's ``--rope_theta``)."""
    from transformers import AutoModelForCausalLM

    from .patch import apply_seq_parallel_monkey_patch

    config = load_config(spec, rope_theta)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, config=config, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as err:
        raise _load_error(spec.path, err) from None
    tokenizer = load_tokenizer(spec)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise UserError(f"{spec.path}: config.{attr} is set; the chunked NLL assumes logits = lm_head(hidden): "
                            "evaluate another model")
    if spec.method is not None:
        apply_seq_parallel_monkey_patch(spec.method, model, **spec.options)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Result keys: what a result depends on, by content
# ---------------------------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack")
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                    "_attn_implementation_autoset", "_attn_implementation", "attn_implementation")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_path() -> Path:
    root = os.environ.get("EASY_CONTEXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "easy_context")
    return Path(root) / "file_sha256.json"


def file_sha256(path) -> str:
    """SHA-256 of a file's content, remembered (by path, size, modification time and inode) in
    ``~/.cache/easy_context`` so large weights are read once."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = _cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if stamp in cache:
        return cache[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    cache[stamp] = h.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # the cache is an optimisation only
    return cache[stamp]


def config_fingerprint(config) -> str:
    """SHA-256 of a model config's content, without its name, path and versions (a copy of a model in another
    folder has the same fingerprint)."""
    data = config.to_dict()
    for key in _VOLATILE_CONFIG:
        data.pop(key, None)
    return _sha256_text(json.dumps(data, sort_keys=True, default=str))


def weights_fingerprint(path: str, model=None) -> str:
    """SHA-256 over the weight files of a model folder (names within the folder and contents); for a model that is
    not a local folder, over the loaded ``model``'s tensors."""
    folder = Path(path)
    files = sorted({p for pattern in _WEIGHT_FILES for p in folder.glob(pattern)}) if folder.is_dir() else []
    h = hashlib.sha256()
    if files:
        for f in files:
            h.update(f"{f.name}|{file_sha256(f)}\n".encode())
        return h.hexdigest()
    if model is None:
        raise UserError(f"{path}: no weight files ({', '.join(_WEIGHT_FILES)}) to fingerprint")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), getattr(tokenizer, "chat_template", None)])
    return _sha256_text(text + extra)


def tokens_fingerprint(samples: Sequence[torch.Tensor], length: Optional[int] = None) -> str:
    """SHA-256 (16 hex digits) of token ids: the first ``length`` tokens of every sample (all when ``None``)."""
    h = hashlib.sha256()
    for sample in samples:
        ids = sample[:length] if length is not None else sample
        h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def model_identity(spec: ModelSpec, tokenizer, *, dtype: torch.dtype, rope_theta: Optional[float] = None,
                   model=None) -> dict:
    """What a result depends on about the model: its config (with ``rope_theta``), a fingerprint of its weights,
    its tokenizer, the attention method with its options, and the dtype. Not its folder's name."""
    return {"config": config_fingerprint(load_config(spec, rope_theta))[:16],
            "weights": weights_fingerprint(spec.path, model)[:16],
            "tokenizer": tokenizer_fingerprint(tokenizer)[:16],
            "method": spec.method or "plain", "options": {k: spec.options[k] for k in sorted(spec.options)},
            "dtype": str(dtype).replace("torch.", ""), "rope_theta": rope_theta}


def result_key(*parts) -> str:
    """A 12-hex-digit key of JSON-serialisable parts."""
    return _sha256_text(json.dumps(parts, sort_keys=True, default=str))[:12]


def unique_labels(entries: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    """``{key: label}`` for ``(key, base label)`` pairs: the base label, with ``#<key>`` appended where two keys
    share one."""
    by_label: Dict[str, set] = {}
    for key, label in entries:
        by_label.setdefault(label, set()).add(key)
    return {key: label if len(by_label[label]) == 1 else f"{label}#{key[:6]}" for key, label in entries}


# ---------------------------------------------------------------------------------------------------------------
# Token data
# ---------------------------------------------------------------------------------------------------------------


def token_lengths(min_tokens: int, max_tokens: int, step: int, explicit: Optional[Sequence[int]] = None) -> List[int]:
    """``explicit`` if given, else ``min_tokens, min_tokens + step, ...`` up to and including ``max_tokens``."""
    if explicit:
        lengths = sorted(set(int(x) for x in explicit))
    else:
        if step <= 0 or min_tokens <= 0 or max_tokens < min_tokens:
            raise ValueError(f"bad length range: min {min_tokens}, max {max_tokens}, step {step}")
        lengths = list(range(min_tokens, max_tokens + 1, step))
        if lengths[-1] != max_tokens:
            lengths.append(max_tokens)
    if not lengths or lengths[0] < 2:
        raise ValueError(f"lengths must be at least 2 tokens, got {lengths}")
    return lengths


def read_text_folder(folder) -> str:
    """The ``*.txt`` files of ``folder`` in name order, joined by blank lines."""
    folder = Path(folder)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {folder}")
    return "\n\n".join(p.read_text(encoding="utf-8") for p in files)


def _tokenize_prefix(text: str, tokenizer, n_tokens: int) -> List[int]:
    """At least ``n_tokens`` token ids of ``text`` (fewer only if the text ends), tokenizing no more than needed."""
    ids: List[int] = []
    pos, piece = 0, max(16_384, n_tokens * 6)
    while len(ids) < n_tokens and pos < len(text):
        end = min(len(text), pos + piece)
        if end < len(text):  # cut at a paragraph or line break, so no word is split
            brk = max(text.rfind("\n\n", pos, end), text.rfind("\n", pos, end))
            end = brk + 1 if brk > pos else end
        ids += tokenizer(text[pos:end], add_special_tokens=False).input_ids
        pos = end
    return ids


def _is_text_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.txt")) and not (path / "dataset_info.json").exists()


class TokenSamples(list):
    """A list of 1-D token tensors that knows where it came from: ``source`` (a fingerprint of the text, or of the
    dataset, split, subset and column) for result keys."""

    source: str = ""


def load_token_samples(dataset: Optional[str], tokenizer, n_samples: int, n_tokens: int, *, split: str = "test",
                       feature: str = "input_ids", subset: Optional[str] = None) -> TokenSamples:
    """``n_samples`` 1-D token tensors of ``n_tokens`` tokens each; a length-``L`` evaluation uses their prefixes.

    ``dataset`` is a folder of ``.txt`` files (default: the Austen novels), whose token stream is cut into
    consecutive windows; or a HuggingFace dataset (a ``save_to_disk`` folder or a hub name loaded with ``split`` and
    the configuration ``subset``) whose ``feature`` column holds token ids or text. Its first ``n_samples`` rows of
    at least ``n_tokens`` tokens are used. The result's ``source`` fingerprints the text or the dataset.
    """
    if dataset is None:
        from .assets import austen_dir

        dataset = str(austen_dir())
    path = Path(dataset)
    samples = TokenSamples()
    if _is_text_folder(path):
        text = read_text_folder(path)
        samples.source = "text:" + _sha256_text(text)[:16]
        ids = _tokenize_prefix(text, tokenizer, n_samples * n_tokens)
        if len(ids) < n_samples * n_tokens:
            raise UserError(f"{path} has {len(ids)} tokens, fewer than {n_samples} samples x {n_tokens} tokens: "
                            "lower --samples or the longest length, or add text")
        stream = torch.tensor(ids[: n_samples * n_tokens], dtype=torch.long)
        samples.extend(stream.view(n_samples, n_tokens))
        return samples
    if path.exists() and not path.is_dir() or (path.is_dir() and not (path / "dataset_info.json").exists()
                                               and not (path / "dataset_dict.json").exists()):
        raise UserError(f"--dataset {dataset}: not a folder of .txt files nor a dataset saved with save_to_disk")

    import datasets

    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(dataset, name=subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise UserError(f"cannot load --dataset {dataset} ({str(err).splitlines()[0][:200]}): pass a folder of "
                        ".txt files, a save_to_disk folder or a reachable hub dataset") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"dataset {dataset} has no split {split!r} (splits: {list(data)}): pass --split")
        data = data[split]
    if feature not in data.column_names:
        raise UserError(f"dataset {dataset} has no column {feature!r} (columns: {data.column_names}); "
                        "pass --feature")
    samples.source = "dataset:" + result_key(getattr(data, "_fingerprint", None) or dataset, split, subset, feature)
    for row in data:
        value = row[feature]
        ids = _tokenize_prefix(value, tokenizer, n_tokens) if isinstance(value, str) else list(value)
        if len(ids) >= n_tokens:
            samples.append(torch.tensor(ids[:n_tokens], dtype=torch.long))
            if len(samples) == n_samples:
                return samples
    raise UserError(f"dataset {dataset} has only {len(samples)} rows of at least {n_tokens} tokens; "
                    f"{n_samples} were asked for: lower --samples or the longest length")


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------


def _decoder_and_head(model):
    return model.get_decoder(), model.get_output_embeddings()


@torch.no_grad()
def local_nll(model, spec: ModelSpec, input_ids: torch.Tensor, target_ids: torch.Tensor, runtime: Runtime,
              chunk_size: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(NLL sum, valid target count)`` for one ``(1, S)`` sequence, both float64.

    Under a sequence-parallel method every rank must call it with the same sequence and holds a shard of the
    tokens; otherwise the whole sequence runs here. Logits exist for ``chunk_size`` tokens at a time. Sum the results
    over ranks (:func:`easy_context.comm.all_reduce_sum`) for the exact token-weighted total.
    """
    decoder, head = _decoder_and_head(model)
    if spec.sequence_parallel:
        local = prepare_seq_parallel_inputs(spec.method, input_ids, None, target_ids, runtime.rank,
                                            runtime.world_size, runtime.device, pad=True)
        ids, pos, targets = local["local_input_ids"], local["local_position_ids"], local["local_target_ids"]
    else:
        ids, targets = input_ids.to(runtime.device), target_ids.to(runtime.device)
        pos = torch.arange(ids.shape[1], device=runtime.device).unsqueeze(0)
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    total, count = chunked_cross_entropy_sum(hidden, head.weight, targets, bias=getattr(head, "bias", None),
                                             chunk_size=chunk_size)
    return total.double(), count.double()


def perplexity_by_length(model, spec: ModelSpec, samples: Sequence[torch.Tensor], lengths: Sequence[int],
                         runtime: Runtime, chunk_size: int = 4096, progress=None,
                         on_result=None) -> Dict[int, float]:
    """``{length: perplexity}``: for each length L, every sample's first L tokens predict their next token.

    Each sample contributes L predictions (inputs ``x[:L]``, targets ``x[1:L+1]``), so samples must hold at least
    ``max(lengths) + 1`` tokens. Sequence-parallel models run every sample on all ranks; other models spread the
    samples over the ranks. Either way NLL sums and counts are all-reduced before dividing. ``on_result(length,
    ppl)`` is called as each length finishes (on every rank).
    """
    results = {}
    for length in lengths:
        total = torch.zeros(2, dtype=torch.float64)
        for i, sample in enumerate(samples):
            if sample.numel() < length + 1:
                raise ValueError(f"sample {i} has {sample.numel()} tokens; length {length} needs {length + 1}")
            if spec.sequence_parallel or i % runtime.world_size == runtime.rank:
                x = sample[: length + 1].unsqueeze(0)
                nll, count = local_nll(model, spec, x[:, :-1], x[:, 1:], runtime, chunk_size)
                total += torch.stack([nll.cpu(), count.cpu()])
            if progress is not None:
                progress.update(1)
        nll, count = all_reduce_sum(total.to(runtime.device)).tolist() if runtime.world_size > 1 else total.tolist()
        results[length] = math.exp(nll / count)
        if on_result is not None:
            on_result(length, results[length])
    return results


def read_ppl_csv(path) -> Dict[str, Dict[int, float]]:
    """``{model label: {length: perplexity}}`` from a CSV written by :func:`write_ppl_csv` (empty if missing)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    lengths = [int(x) for x in rows[0][1:]]
    table = {}
    for row in rows[1:]:
        if row:
            table[row[0]] = {n: float(v) for n, v in zip(lengths, row[1:]) if v != ""}
    return table


def write_ppl_csv(path, table: Dict[str, Dict[int, float]]) -> None:
    """One row per model, one column per length (EasyContext's layout); a missing length is an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = sorted({n for row in table.values() for n in row})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *lengths])
        for label, row in table.items():
            writer.writerow([label, *[f"{row[n]:.6f}" if n in row else "" for n in lengths]])


class PplResults:
    """Perplexity results keyed on content: ``<csv stem>.results.jsonl`` next to the CSV holds one record per model
    key and length (with the fingerprint of the tokens scored), and the CSV is rendered from it.

    A model key (:func:`model_identity` + the dataset's source fingerprint + the number of samples) decides the row;
    a cell is reused by ``--resume`` only when the tokens scored at that length are the same. Rows sharing a folder
    name get unique labels (``name#key``). A CSV written before keys existed is kept as ``<stem>.legacy.csv``.
    """

    def __init__(self, csv_path, *, main: bool = True):
        self.csv = Path(csv_path)
        self.path = self.csv.with_name(self.csv.stem + ".results.jsonl")
        self.notes: List[str] = []
        if main and self.csv.exists() and not self.path.exists():
            legacy = self.csv.with_name(self.csv.stem + ".legacy.csv")
            os.replace(self.csv, legacy)
            self.notes.append(f"{self.csv} was written without result keys: kept as {legacy}")
        self.records = read_trials(self.path)

    def lookup(self, key: str, length: int, data: str) -> Optional[float]:
        """The perplexity already measured for this model key, length and tokens, if any."""
        found = [r for r in self.records if r.get("key") == key and r.get("length") == length
                 and r.get("data") == data]
        return found[-1]["ppl"] if found else None

    def add(self, record: dict, write: bool = True) -> None:
        """Record one result (every rank keeps it in memory; ``write`` on the main process appends it)."""
        self.records.append(record)
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def labels(self) -> Dict[str, str]:
        latest = {r["key"]: r.get("label", r["key"]) for r in self.records if "key" in r}
        return unique_labels(list(latest.items()))

    def table(self) -> Dict[str, Dict[int, float]]:
        """``{unique label: {length: perplexity}}``, rows in order of first appearance, latest result per cell."""
        labels, rows = self.labels(), {}
        for r in self.records:
            if "key" in r:
                rows.setdefault(labels[r["key"]], {})[int(r["length"])] = float(r["ppl"])
        return rows

    def write_csv(self) -> Dict[str, Dict[int, float]]:
        table = self.table()
        write_ppl_csv(self.csv, table)
        return table


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(table: Dict[str, Dict[int, float]], path, title: str = "Perplexity by context length",
                    pretraining_length: Optional[int] = None) -> None:
    """Line plot of perplexity against context length, one line per model (log scale when the values span more
    than 3×); PNG, PDF or SVG by the file suffix."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, row in table.items():
        lengths = sorted(row)
        ax.plot(lengths, [row[n] for n in lengths], marker="o", label=label)
    if pretraining_length:
        ax.axvline(pretraining_length, color="grey", linestyle=":", label=f"trained length ({pretraining_length})")
    values = [v for row in table.values() for v in row.values()]
    if values and max(values) > 3 * min(values):  # log scale only when the curves span a wide range
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if max(values) < 10 * min(values)
                                     else NullFormatter())
        ax.set_ylabel("perplexity (log scale)")
    else:
        ax.set_ylabel("perplexity")
    lengths = sorted({n for row in table.values() for n in row})
    if len(lengths) <= 16:
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Needle in a haystack
# ---------------------------------------------------------------------------------------------------------------

# A sentence ends with . ! or ?, possibly followed by closing quotes or brackets, then whitespace; a blank line
# (paragraph break) is a boundary too.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+|\n\s*\n")

DEFAULT_NAMES = ("Chicago", "Yangon", "Colombo", "Almaty", "Sydney", "Lagos", "Amsterdam", "Belgrade", "Cairo",
                 "Kigali", "Dakar", "Sofia", "Victoria", "Tashkent", "Mumbai", "Barcelona", "Amman", "Toronto")


@dataclass(frozen=True)
class NeedleConfig:
    """What is hidden and asked. ``{answer}`` in ``needle`` is replaced by the trial's answer.

    The answer is ``answer`` when given, else a random number of ``digits`` digits per trial. Distractors are
    ``distractor`` sentences (``{name}``, ``{number}``) with other numbers, at random sentence boundaries.
    """

    needle: str = "The special magic number is: {answer}."
    question: str = "What is the special magic number?"
    answer_prefix: str = "The special magic number is:"
    intro: str = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about it.")
    answer: Optional[str] = None
    digits: int = 7
    distractors: int = 0
    distractor: str = "The special magic number for {name} is: {number}."
    chat_template: bool = True
    seed: int = 0

    def key(self) -> str:
        """A short hash of everything that defines the trials (resuming only reuses trials with the same key)."""
        blob = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass
class NeedleTrial:
    """One prompt. ``input_ids`` ``(1, S)`` ends with the answer tokens, at ``answer_positions``; generation starts
    from ``input_ids[:, :generation_length]`` (the prompt before the answer prefix)."""

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    generation_length: int
    answer: str
    needle_depth: float
    distractor_numbers: List[str]


def _random_number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


class Haystack:
    """Needle prompts of a given token length from one text, for one tokenizer."""

    def __init__(self, text: str, tokenizer, config: NeedleConfig):
        self.text = text
        self.tokenizer = tokenizer
        self.config = config
        self._offsets: List[Tuple[int, int]] = []
        self._tokenized_chars = 0

    # -- text pieces ----------------------------------------------------------------------------------------------

    def _token_offsets(self, n_tokens: int) -> List[Tuple[int, int]]:
        """Character spans of the first ``n_tokens`` tokens of the text (tokenized once, grown on demand)."""
        chars = max(self._tokenized_chars, 1)
        while len(self._offsets) < n_tokens + 1 and self._tokenized_chars < len(self.text):
            chars = min(len(self.text), max(chars * 2, n_tokens * 6 + 10_000))
            enc = self.tokenizer(self.text[:chars], add_special_tokens=False, return_offsets_mapping=True)
            self._offsets, self._tokenized_chars = list(enc["offset_mapping"]), chars
        if len(self._offsets) < n_tokens:
            raise ValueError(f"the haystack has {len(self._offsets)} tokens, fewer than the {n_tokens} needed")
        return self._offsets

    def _hay(self, n_tokens: int) -> str:
        """The first ``n_tokens`` tokens of the text, as text."""
        if n_tokens <= 0:
            return ""
        return self.text[: self._token_offsets(n_tokens)[n_tokens - 1][1]]

    def _render(self, context: str, answer: str) -> Tuple[str, str, int]:
        """``(full text, generation prompt, answer start character)`` for a context."""
        cfg = self.config
        body = f"{cfg.intro}\n\n{context}\n\n{cfg.question}"
        if cfg.chat_template and getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                        add_generation_prompt=True)
        else:
            prompt = f"{body}\n"
        full = f"{prompt}{cfg.answer_prefix} {answer}"
        return full, prompt, len(full) - len(answer)

    def _encode(self, text: str):
        # A chat template already spells out its special tokens; raw text gets the tokenizer's own (e.g. BOS).
        special = not (self.config.chat_template and getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)

    # -- trials -----------------------------------------------------------------------------------------------------

    def trial(self, length: int, depth: float, sample: int = 0) -> NeedleTrial:
        """A prompt of at most ``length`` tokens (a few fewer where token merges differ) with the needle at
        ``depth`` (0 = start of the haystack, 1 = end), on the sentence boundary nearest to that point."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        cfg = self.config
        rng = random.Random(f"{cfg.seed}|{length}|{depth:.6f}|{sample}")
        answer = cfg.answer if cfg.answer is not None else _random_number(rng, cfg.digits)
        needle = cfg.needle.format(answer=answer)
        numbers: List[str] = []
        while len(numbers) < cfg.distractors:
            number = _random_number(rng, cfg.digits)
            if number != answer and number not in numbers:
                numbers.append(number)
        names = rng.sample(DEFAULT_NAMES, k=min(len(DEFAULT_NAMES), len(numbers))) if numbers else []
        distractors = [cfg.distractor.format(name=names[i % len(names)], number=n) for i, n in enumerate(numbers)]

        inserts = [needle, *distractors]
        fixed = len(self._encode(self._render(" ".join(inserts), answer)[0]).input_ids)
        budget, best = length - fixed, None
        for _ in range(8):  # token merges at the seams shift the count a little: converge on `length`
            if budget < 0:
                raise ValueError(f"length {length} is too short for the prompt, needle and answer ({fixed} tokens)")
            context, needle_depth = self._place(self._hay(budget), inserts, depth, random.Random(rng.random()))
            full, prompt, answer_start = self._render(context, answer)
            enc = self._encode(full)
            if len(enc.input_ids) <= length and (best is None or len(enc.input_ids) > len(best[3].input_ids)):
                best = (context, needle_depth, (full, prompt, answer_start), enc)
            if len(enc.input_ids) == length:
                break
            budget += length - len(enc.input_ids)
        if best is None:
            raise RuntimeError(f"could not fit a needle prompt into {length} tokens")
        _, needle_depth, (full, prompt, answer_start), enc = best
        offsets = enc["offset_mapping"]
        positions = [i for i, (a, b) in enumerate(offsets) if b > answer_start and a < len(full) and b > a]
        prefix_start = len(prompt)
        generation_length = sum(1 for a, b in offsets if b <= prefix_start)
        if not positions or positions[0] == 0:
            raise RuntimeError("the answer tokens could not be located in the tokenized prompt")
        return NeedleTrial(
            input_ids=torch.tensor([enc.input_ids], dtype=torch.long),
            answer_positions=torch.tensor(positions, dtype=torch.long),
            generation_length=generation_length,
            answer=answer,
            needle_depth=needle_depth,
            distractor_numbers=numbers,
        )

    @staticmethod
    def _place(hay: str, inserts: List[str], depth: float, rng: random.Random) -> Tuple[str, float]:
        """Insert ``inserts[0]`` (the needle) on the sentence boundary nearest to ``depth`` of ``hay`` and
        the others (distractors) on random boundaries; returns the text and the needle's depth in characters."""
        # Boundaries lie just after whitespace. The haystack is cut at a token, so its end is a boundary only
        # when it ends a sentence; otherwise the deepest place is before its last, partial sentence.
        bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(hay)]
        needle_at = min(bounds, key=lambda b: (abs(b - depth * len(hay)), b))
        others = [b for b in bounds if b != needle_at] or bounds
        spots = sorted([(needle_at, 0)] + [(rng.choice(others), i) for i in range(1, len(inserts))])
        pieces, last, needle_char = [], 0, 0
        for at, i in spots:
            pieces.append(hay[last:at])
            last = at
            if i == 0:
                needle_char = sum(map(len, pieces))
            pieces.append(inserts[i] + " ")
        pieces.append(hay[last:])
        context = "".join(pieces).rstrip()
        return context, needle_char / max(1, len(context))


@torch.no_grad()
def forced_answer_predictions(model, spec: ModelSpec, trial: NeedleTrial, runtime: Runtime,
                              sequence_parallel: bool) -> torch.Tensor:
    """The model's greedy (argmax) token at each answer position, given the true tokens before it (teacher forcing).

    With ``sequence_parallel`` all ranks prefill the prompt together, each computes logits only at the positions
    it holds that precede an answer token, and the predictions are summed over ranks (each position is held by one
    rank). Otherwise this process runs the whole prompt.
    """
    decoder, head = _decoder_and_head(model)
    ids = trial.input_ids
    if sequence_parallel:
        local = prepare_seq_parallel_inputs(spec.method, ids, None, None, runtime.rank, runtime.world_size,
                                            runtime.device, pad=True)
        ids, pos = local["local_input_ids"], local["local_position_ids"]
    else:
        ids = ids.to(runtime.device)
        pos = torch.arange(ids.shape[1], device=runtime.device).unsqueeze(0)
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
    wanted = (trial.answer_positions - 1).to(runtime.device)  # logits at p-1 predict token p
    local_pos = pos[0]
    match = local_pos.unsqueeze(1) == wanted.unsqueeze(0)  # (local tokens, answers)
    token_idx, answer_idx = match.nonzero(as_tuple=True)
    preds = torch.zeros(len(wanted), dtype=torch.float64, device=runtime.device)
    if token_idx.numel():
        logits = head(hidden[token_idx]).float()
        preds[answer_idx] = logits.argmax(-1).double() + 1  # +1: zero means "not held here"
    if sequence_parallel and runtime.world_size > 1:
        preds = all_reduce_sum(preds)
    return (preds - 1).long().cpu()


@torch.no_grad()
def generate_answer(model, tokenizer, trial: NeedleTrial, device, max_new_tokens: int = 32) -> str:
    """Greedy decoding with the KV cache from the prompt (without the answer prefix); returns the new text."""
    prompt = trial.input_ids[:, : trial.generation_length].to(device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def read_trials(path) -> List[dict]:
    """Records of a JSONL trials file (empty if missing); a truncated last line (interrupted run) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def needle_accuracy_grid(records: Iterable[dict], model: str, mode: str):
    """``(lengths, depths, grid)`` with ``grid[d][l]`` the mean ``<mode>_correct`` of that cell (NaN if empty)."""
    cells: Dict[Tuple[float, int], List[float]] = {}
    for r in records:
        if r.get("model") == model and f"{mode}_correct" in r:
            cells.setdefault((float(r["depth"]), int(r["length"])), []).append(float(r[f"{mode}_correct"]))
    lengths = sorted({n for _, n in cells})
    depths = sorted({d for d, _ in cells})
    grid = [[(sum(cells[(d, n)]) / len(cells[(d, n)])) if (d, n) in cells else float("nan") for n in lengths]
            for d in depths]
    return lengths, depths, grid


def plot_needle_heatmaps(records: Sequence[dict], path, modes: Sequence[str], models: Optional[Sequence[str]] = None,
                         title: str = "Needle in a haystack") -> Dict[Tuple[str, str], float]:
    """One heatmap panel (depth × length, accuracy 0-1 from red to green) per model and scoring mode.

    Returns ``{(model, mode): mean accuracy}`` over the trials shown.
    """
    plt = _matplotlib()
    import numpy as np

    models = list(models) if models else list(dict.fromkeys(r["model"] for r in records))
    panels = [(m, mode) for m in models for mode in modes
              if any(r.get("model") == m and f"{mode}_correct" in r for r in records)]
    if not panels:
        raise ValueError("no trials to plot")
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), dpi=120, squeeze=False)
    means = {}
    image = None
    for ax, (model, mode) in zip(axes.flat, panels):
        lengths, depths, grid = needle_accuracy_grid(records, model, mode)
        values = np.array(grid, dtype=float)
        means[(model, mode)] = float(np.nanmean(values)) if values.size else float("nan")
        image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{model}\n{mode} scoring, mean accuracy {means[(model, mode)]:.2f}", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, y=1.0 + 0.06 / rows)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy", shrink=0.8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return means
