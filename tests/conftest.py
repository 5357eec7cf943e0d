import os
import sys

# Make the helper modules in tests/ importable (also by the spawned worker processes).
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_family_patch_leaks():
    """A family patch switches every later model of the family; a test that makes one must remove it."""
    yield
    from easy_context import patch

    leaked = {cls.__name__: name for cls, name in patch._FAMILY_IMPLEMENTATION.items()}
    patch._FAMILY_IMPLEMENTATION.clear()
    assert not leaked, f"the test left family patches in place: {leaked}"
