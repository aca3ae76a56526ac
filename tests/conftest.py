"""Shared fixtures. Tests import wsolbench as installed, never through the repository root."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("WSOLBENCH_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real metadata, masks, golden numbers); skip if absent."""
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"{path} is absent (set WSOLBENCH_SHARED to point at the shared folder)")
    return path


@pytest.fixture(scope="module")
def torch_threads():
    """Call with a thread count inside a module fixture: small tensors run faster on few threads
    on a shared 2-core machine; the previous count is restored afterwards."""
    import torch

    def limit(count: int):
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        yield
        torch.set_num_threads(previous)

    return limit
