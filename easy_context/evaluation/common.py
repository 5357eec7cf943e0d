"""What long-context evaluations share: model specs, processes, model loading and token data.

* **Model specs.** ``[PATH][@METHOD[:KEY=VALUE,...]]`` names a model and the attention method attached to it
  (:func:`parse_model_spec`); :func:`load_model` loads and patches it.
* **Processes.** :func:`init_runtime` joins the process group that ``accelerate launch`` or ``torchrun`` set up (gloo
  on CPU, NCCL on GPUs), or runs a single process. A *sequence-parallel* method shards every sequence over all
  processes; any other model (plain or DCA) gets whole sequences, spread over the processes.
* **Token data.** :func:`load_token_samples` cuts a text folder or a dataset into samples of a given length.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..assets import austen_dir
from ..cli import DEFAULT_DIST_TIMEOUT, UserError, float_range, int_range
from ..methods import get_method
from ..model_config import set_rope_theta, text_config
from ..patch import apply_seq_parallel_monkey_patch
from .results import (config_fingerprint, result_key, sha256_text, tokenizer_fingerprint,
                      weights_fingerprint)

__all__ = ["PLAIN", "ModelSpec", "parse_model_spec", "add_common_options", "check_lengths", "Runtime", "init_runtime",
           "shutdown_runtime", "resolve_dtype", "load_model", "load_config", "load_tokenizer", "token_lengths",
           "read_text_folder", "TokenSamples", "load_token_samples", "decoder_and_head", "pyplot",
           "model_identity"]

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

    config = load_config(spec, rope_theta)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, config=config, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as err:
        raise _load_error(spec.path, err) from None
    tokenizer = load_tokenizer(spec)
    config = text_config(model.config)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise UserError(f"{spec.path}: config.{attr} is set; the chunked NLL assumes logits = lm_head(hidden): "
                            "evaluate another model")
    if spec.method is not None:
        apply_seq_parallel_monkey_patch(spec.method, model, **spec.options)
    return model, tokenizer


def model_identity(spec: ModelSpec, tokenizer, *, dtype: torch.dtype, rope_theta: Optional[float] = None,
                   model=None) -> dict:
    """What a result depends on about the model: its config (with ``rope_theta``), a fingerprint of its weights,
    its tokenizer, the attention method with its options, and the dtype. Not its folder's name."""
    return {"config": config_fingerprint(load_config(spec, rope_theta))[:16],
            "weights": weights_fingerprint(spec.path, model)[:16],
            "tokenizer": tokenizer_fingerprint(tokenizer)[:16],
            "method": spec.method or "plain", "options": {k: spec.options[k] for k in sorted(spec.options)},
            "dtype": str(dtype).replace("torch.", ""), "rope_theta": rope_theta}


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
        dataset = str(austen_dir())
    path = Path(dataset)
    samples = TokenSamples()
    if _is_text_folder(path):
        text = read_text_folder(path)
        samples.source = "text:" + sha256_text(text)[:16]
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


def decoder_and_head(model):
    """The decoder (hidden states) and the output head of a causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


def pyplot():
    """matplotlib's pyplot with a backend that needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
