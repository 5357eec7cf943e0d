"""The attention methods: :class:`~easy_context.methods.base.Method`, the registry, and one module per schedule.

Importing this package imports every method module, which registers its method; :func:`get_method` then finds it by
name. A method module takes :class:`Method` and :func:`register` from :mod:`easy_context.methods.base`.
"""

from .base import Method, available_methods, document_methods, get_method, register
from . import data_parallel, ring, zigzag, stripe, dca, dist_flash, ulysses, usp  # noqa: F401 - each registers itself

__all__ = ["Method", "register", "get_method", "available_methods", "document_methods"]
