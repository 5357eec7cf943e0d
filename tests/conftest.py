import os
import sys

# Make the helper modules in tests/ importable (also by the spawned worker processes).
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token stores that train.py builds go to a folder of this test session (inherited by the processes tests launch),
# not to the user's cache.
if "EASY_CONTEXT_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["EASY_CONTEXT_CACHE"] = tempfile.mkdtemp(prefix="easy_context_test_cache-")
    atexit.register(shutil.rmtree, os.environ["EASY_CONTEXT_CACHE"], True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_family_patch_leaks():
    """A family patch switches every later model of the family; a test that makes one must remove it."""
    yield
    from easy_context import hf_attention

    leaked = {cls.__name__: name for cls, name in hf_attention.family_patches().items()}
    hf_attention.clear_family_patches()
    assert not leaked, f"the test left family patches in place: {leaked}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four Austen passages as a jsonl file: several documents (about 2.4K tokens, 19 samples of 128 tokens), for
    the train.py tests."""
    import json

    from easy_context.assets import austen_texts

    texts = list(austen_texts().values())
    path = tmp_path_factory.mktemp("data") / "austen.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(texts[:4]):
            f.write(json.dumps({"text": text[1000 * i: 1000 * i + 2500]}) + "\n")
    return str(path)
