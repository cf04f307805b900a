"""scripts/setup_env.sh on an environment that already has everything.

`make test` and `make demo` run the setup script every time, so on a complete
environment it must only check, never install (no network, no uv download).
"""
import pytest
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_setup_on_a_complete_environment_installs_nothing():
    env = dict(os.environ, D2_DISTILL_VENV=sys.prefix,
               # were anything installed, it would fail here instead of fetching
               UV_INDEX_URL="http://127.0.0.1:9/simple", PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_NO_INDEX="1", UV_OFFLINE="1")
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup_env.sh")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("[setup]")]
    assert len(lines) == 1 and lines[0].startswith(f"[setup] environment ready: {sys.prefix}"), lines
    assert "torch 2.14.1" in lines[0]
