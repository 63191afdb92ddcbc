"""Shared fixtures: where the real VHDX samples live, and whether qemu-img may be skipped."""
from __future__ import annotations

import bz2
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SAMPLES = SHARED / "vhdx-samples"


def _need_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required in CI: apt-get install -y qemu-utils")
    pytest.skip(f"{name} not installed (apt-get install -y qemu-utils)")


@pytest.fixture
def require_qemu() -> str:
    """Path of qemu-img; interop tests fail rather than skip when CI is set."""
    _need_tool("qemu-io")
    return _need_tool("qemu-img")


@pytest.fixture
def sample(tmp_path):
    """Decompress one of ../shared/vhdx-samples into tmp_path and return its path."""
    def load(name: str) -> Path:
        src = SAMPLES / f"{name}.bz2"
        if not src.exists():
            if os.environ.get("CI"):
                pytest.fail(f"sample {src} missing: CI needs shared/ beside the clone")
            pytest.skip(f"sample {src} not present")
        out = tmp_path / name
        with bz2.open(src) as f, open(out, "wb") as g:
            shutil.copyfileobj(f, g)
        return out
    return load
