"""README command 1: the demo stack starts and serves a completion."""

import os
import subprocess
import sys

import harness


def test_demo_stack_serves_a_completion(wasm):
    p = subprocess.run([sys.executable, os.path.join(harness.HERE, "stack.py"), "--check"],
                       capture_output=True, timeout=120, cwd=harness.ROOT)
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    assert p.returncode == 0, out[-4000:]
    assert "demo check: 200" in out
    assert "onboarded at runtime through the admin API" in out
