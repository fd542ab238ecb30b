"""Every Triton kernel compiles for an H100 (sm_90) on this CPU machine (`scripts/compile_kernels.py`:
triton ships ptxas). The interpreter the other kernel tests run under accepts code that the compiler
refuses; this finds such code before GPU time is spent on it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compilable kernels only
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    compiled, _, total = last.split()[:3]
    assert compiled == total and int(total) >= 19, last


def test_the_check_refuses_to_run_under_the_interpreter():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py")],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr
