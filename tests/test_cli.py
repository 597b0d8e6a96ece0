"""`python -m mvit3` commands that need no GPU."""

from __future__ import annotations

import subprocess
import sys

import mvit3


def test_info_lists_every_model_with_params_and_macs():
    out = subprocess.run([sys.executable, "-m", "mvit3", "info"], capture_output=True, text=True,
                         check=True).stdout
    for name in mvit3.list_models():
        assert f"| {name} " in out
    assert "2,490,360" in out and "927.0" in out  # v3-XS params and paper MACs
    assert "Kernel backends" in out and "torch   available" in out


def test_unknown_command_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "mvit3", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr
