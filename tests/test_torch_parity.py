"""Parity with a PyTorch model of the original (runs only where torch is installed)."""

import argparse

import pytest

pytest.importorskip("torch")

from parity import famf_torch_parity  # noqa: E402


def test_predict_matches_pytorch_reference():
    checks, _ = famf_torch_parity.run(argparse.Namespace(size=32, batch=3, seed=1))
    failed = {k: v for k, (v, tol) in checks.items() if not v <= tol}
    assert not failed, failed
