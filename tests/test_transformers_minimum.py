"""The oldest transformers that pyproject.toml admits passes the library's fast tests that touch transformers.

``scripts/setup.sh`` builds ``.venv-min`` with exactly that release. This test runs there, in a subprocess, every test
of the files below that needs neither the fetched assets nor more than a minute (``-m "not real_model and not
slow"``): the patch and its refusals, the silent-error cases, the config sweep's fast part, DCA and the tiny models
end to end. The schedules' own tests (kernels, rings, Ulysses) do not import transformers, and the scripts' tests
launch processes for minutes; both run on the newest transformers only.
"""

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ["test_patch_errors.py", "test_silent_errors.py", "test_config_sweep.py", "test_dca.py", "test_end_to_end.py",
         "test_checkpointing.py"]
MIN_PYTHON = ROOT / os.environ.get("VENV_MIN", ".venv-min") / "bin" / "python"


def _minimum() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.sub("^transformers>=", "", d) for d in deps if d.startswith("transformers>="))


@pytest.mark.skipif(os.environ.get("EASY_CONTEXT_IN_MIN_VENV") == "1", reason="already the minimum run")
def test_fast_tests_pass_on_the_oldest_supported_transformers():
    if not MIN_PYTHON.exists():
        pytest.fail(f"{MIN_PYTHON} is missing: run bash scripts/setup.sh, which builds it")
    version = subprocess.run([str(MIN_PYTHON), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == _minimum(), f"{MIN_PYTHON} has transformers {version}, pyproject says >={_minimum()}"
    env = {**os.environ, "EASY_CONTEXT_IN_MIN_VENV": "1"}
    result = subprocess.run(
        [str(MIN_PYTHON), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not real_model and not slow",
         *(f"tests/{name}" for name in FILES)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = (result.stdout + result.stderr)[-4000:]
    print(tail)
    assert result.returncode == 0, f"the fast tests fail on transformers {version}:\n{tail}"
    assert re.search(r"\d+ passed", result.stdout), tail
