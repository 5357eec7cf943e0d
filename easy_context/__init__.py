"""easy-context: exact sequence-parallel attention and training-free context extension for HuggingFace causal LMs.

The public API keeps EasyContext's names::

    from easy_context import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs, prepare_dataloader
"""

from .data import gather_seq_parallel, prepare_dataloader, prepare_seq_parallel_inputs
from .loss import chunked_cross_entropy_sum, seq_parallel_cross_entropy, token_weighted_loss
from .mesh import get_sequence_parallel_group, set_sequence_parallel_group
from .methods import available_methods, get_method
from .patch import apply_seq_parallel_monkey_patch

__version__ = "0.1.0"

__all__ = [
    "apply_seq_parallel_monkey_patch",
    "prepare_seq_parallel_inputs",
    "prepare_dataloader",
    "gather_seq_parallel",
    "seq_parallel_cross_entropy",
    "token_weighted_loss",
    "chunked_cross_entropy_sum",
    "set_sequence_parallel_group",
    "get_sequence_parallel_group",
    "available_methods",
    "get_method",
]
