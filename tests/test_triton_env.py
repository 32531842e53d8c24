"""Where the test session runs Triton in its interpreter: only without a CUDA device (tests/conftest.py), never
forced by the Makefile, so the `gpu` kernel tests on a GPU machine run compiled kernels."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from _dist_utils import REPO
from _triton_env import triton_interpret_value


def test_decision_follows_the_device_and_keeps_a_user_setting():
    assert triton_interpret_value({}, cuda_available=False) == "1"
    assert triton_interpret_value({}, cuda_available=True) is None          # compiled kernels on a GPU
    assert triton_interpret_value({"PATH": "/bin"}, cuda_available=True) is None
    assert triton_interpret_value({"TRITON_INTERPRET": "0"}, cuda_available=False) is None   # the user's choice
    assert triton_interpret_value({"TRITON_INTERPRET": "1"}, cuda_available=True) is None


CONFTEST_PROBE = """
import json, os, sys
import torch
torch.cuda.is_available = lambda: {cuda}
sys.path.insert(0, {tests!r})
import conftest
print(json.dumps(os.environ.get("TRITON_INTERPRET")))
"""


@pytest.mark.parametrize("cuda,preset,expected", [
    (True, None, None),          # a GPU machine: nothing set, triton.jit compiles
    (False, None, "1"),          # CPU CI: the interpreter
    (False, "0", "0"),           # set by the user: kept
    (True, "1", "1"),
])
def test_conftest_sets_the_interpreter_only_without_cuda(cuda, preset, expected):
    """tests/conftest.py itself, imported in a fresh process where torch reports a CUDA device (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if preset is not None:
        env["TRITON_INTERPRET"] = preset
    code = CONFTEST_PROBE.format(cuda=cuda, tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


def test_makefile_test_recipe_does_not_force_the_interpreter():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MAKEFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "-n", "test"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    recipe = [line for line in proc.stdout.splitlines() if "pytest" in line]
    assert len(recipe) == 1, proc.stdout
    assert "TRITON_INTERPRET" not in recipe[0]
    assert "OMP_NUM_THREADS=1" in recipe[0] and recipe[0].rstrip().endswith("pytest -q tests")
