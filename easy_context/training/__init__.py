"""The machinery behind ``train.py``, each piece testable on its own; ``train.py`` reads top to bottom and calls it.

* :mod:`~easy_context.training.rope`: RoPE-base formulas for a longer context (and ``python -m
  easy_context.training rope-base``, used by ``train_scripts/``);
* :mod:`~easy_context.training.documents`: the data pipeline, documents -> tokens -> fixed-length samples;
* :mod:`~easy_context.training.corpus`: the same samples from corpora of any size, read from disk when a step
  needs them (token stores, the tokenization cache, ``python -m easy_context.training prepare``);
* :mod:`~easy_context.training.processes`: the parallel options and the sequence- and data-parallel groups;
* :mod:`~easy_context.training.model`: building the model, activation recomputation, the optimizer, and the
  chunked-loss wrapper that owns a step;
* :mod:`~easy_context.training.run_state`: saved run state (atomic checkpoints, the final model) and the run's
  output folder, lock and resume;
* :mod:`~easy_context.training.memory`: peak memory.

Every name is importable from here (``from easy_context import training as T``).
"""

from ..model_config import get_rope_theta, set_rope_theta
from .corpus import PackedSamples, TokenDocuments, check_dataset, open_documents, open_samples
from .documents import (PADDING_WARNING, global_batch_indices, load_documents, pack_documents, padding_fraction,
                        tokenize_documents, warn_padding)
from .memory import PeakMemory, peak_memory_bytes, reset_peak_memory
from .model import (CHECKPOINTING, TINY_CONFIG, ChunkedLossModel, build_model, build_optimizer, enable_checkpointing,
                    loss_chunk_size_arg, model_path, tile_size_arg)
from .processes import check_parallel_options, group_timeout, setup_sequence_parallel
from .rope import ROPE_FORMULAS, ntk_rope_base, rope_base, scaling_law_rope_base
from .run_state import (LATEST, STATE_FILE, Run, check_resume, latest_checkpoint, load_checkpoint, load_resume, on_main,
                        release_locks, run_signature, save_checkpoint, save_final_model, start_run)

__all__ = [
    "ntk_rope_base", "scaling_law_rope_base", "rope_base", "ROPE_FORMULAS", "get_rope_theta", "set_rope_theta",
    "load_documents", "tokenize_documents", "pack_documents", "global_batch_indices",
    "open_samples", "open_documents", "check_dataset", "PackedSamples", "TokenDocuments",
    "check_parallel_options", "setup_sequence_parallel", "model_path", "build_model", "enable_checkpointing",
    "CHECKPOINTING", "build_optimizer", "ChunkedLossModel", "loss_chunk_size_arg", "tile_size_arg",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_final_model", "group_timeout",
    "on_main", "Run", "start_run", "run_signature", "release_locks", "check_resume", "load_resume",
    "padding_fraction", "warn_padding", "PADDING_WARNING", "TINY_CONFIG", "STATE_FILE", "LATEST",
    "reset_peak_memory", "peak_memory_bytes", "PeakMemory",
]
