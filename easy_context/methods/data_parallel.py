"""``data_parallel``: no sequence parallelism. The model keeps its own attention and every rank its whole sequence."""

from .base import Method, register

register(Method(name="data_parallel", description="no sequence parallelism; the model's own attention"))
