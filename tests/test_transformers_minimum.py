"""The oldest transformers that pyproject.toml admits passes the fast tests of everything that touches transformers.

``scripts/setup.sh`` builds ``.venv-min`` with exactly that release. This test runs there, in a subprocess, every test
of the files below that needs neither the weights nor more than a minute (``-m "not real_model and not slow"``): the
patch and its refusals, the silent-error cases, the config sweep's fast part, DCA, the tiny models end to end,
recomputation, the training utilities, the assets, the adapters, eval_ppl.py's fast tests, Ulysses and the mesh on
tiny models, and one train.py run on 2 processes against one process. The schedules' own tests (kernels, rings,
dist_flash, layouts and the loss) use no model and do not import transformers (checked below), so they mean the same
on every release; the remaining scripts' tests launch processes for minutes and run on the newest transformers only.
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ["test_patch_errors.py", "test_silent_errors.py", "test_config_sweep.py", "test_dca.py", "test_end_to_end.py",
         "test_checkpointing.py", "test_training_utils.py", "test_assets.py", "test_adapters.py", "test_eval.py",
         "test_mesh.py", "test_ulysses_usp.py", "test_train.py::test_zigzag_two_processes_match_single_process"]
# Tests of the schedules alone: nothing they import reaches transformers.
SCHEDULE_FILES = ["test_kernels.py", "test_ring_schedules.py", "test_dist_flash.py", "test_layout_and_loss.py"]
MODEL_WORDS = ("transformers", "tiny_model", "AutoModel", "apply_seq_parallel_monkey_patch", "smollm2")
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


@pytest.mark.parametrize("name", SCHEDULE_FILES)
def test_the_schedules_tests_do_not_import_transformers(name):
    """What the minimum run leaves out must not depend on the transformers release: the file names no model, and
    importing it (and so everything it imports at module level) loads no transformers."""
    source = (ROOT / "tests" / name).read_text()
    assert not [w for w in MODEL_WORDS if w in source], f"tests/{name} uses a model: add it to FILES"
    code = (f"import sys; sys.path.insert(0, 'tests'); import importlib.util as u; "
            f"spec = u.spec_from_file_location('m', 'tests/{name}'); m = u.module_from_spec(spec); "
            f"spec.loader.exec_module(m); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", f"tests/{name} imports transformers"
