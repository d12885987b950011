"""Shared pytest fixtures (kept small and generic; module-specific fixtures live in their test files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded generator: every test that uses it sees the same stream."""
    return np.random.default_rng(20240205)


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    """The folder of worked test vectors shared between projects (``../shared/vectors``)."""
    path = (REPO_ROOT.parent / "shared" / "vectors").resolve()
    if not path.is_dir():
        pytest.skip(f"shared test vectors not found at {path} (expected ../shared/vectors next to the repo)")
    return path
