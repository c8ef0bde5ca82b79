"""Venvs of their own for test tools whose pins clash with the project's
(label-studio-sdk wants numpy < 2.3, datumaro older pillow, pyarrow and pandas):
made once per machine under ~/.cache/deconvnet-test-venvs/<tool> (or
$DECONVNET_TEST_VENVS), reused while the pinned version is the one installed.
A test runs the tool in a subprocess of its venv on files an export wrote.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

PINS = {"label-studio-sdk": "label-studio-sdk==2.1.2", "datumaro": "datumaro==1.13.12"}


def venvs_root() -> Path:
    return Path(os.environ.get("DECONVNET_TEST_VENVS", Path.home() / ".cache" / "deconvnet-test-venvs"))


def tool_python(tool: str) -> str:
    """The python of `tool`'s venv, made (python -m venv, pip install the pin) when missing."""
    pin, venv = PINS[tool], venvs_root() / tool
    marker = venv / f".installed-{pin}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{tool}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes make it once
        if not marker.exists():
            for cmd in ([sys.executable, "-m", "venv", "--clear", str(venv)],
                        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                         pin]):
                done = subprocess.run(cmd, capture_output=True, text=True)
                assert done.returncode == 0, f"making the {tool} venv failed: {cmd}\n{done.stdout}\n{done.stderr}"
            marker.touch()
    return str(venv / "bin" / "python")


def run_tool(tool: str, code: str, *args: str) -> str:
    """Run `code` with the tool's python; its stdout. A failure shows its stderr."""
    done = subprocess.run([tool_python(tool), "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{tool} check failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
