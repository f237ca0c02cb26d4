"""Faithful inference against a PyTorch model of the original (parity/famf_torch_parity.py):
live where torch is installed, and everywhere against the outputs it recorded
(tests/data/famf_torch_reference.npz; the weights are regenerated from the recorded seed)."""

import argparse

import numpy as np
import pytest

from parity import reference


def test_predict_matches_the_recorded_pytorch_outputs():
    ref = dict(np.load(reference.RECORDED))
    sd = reference.random_state_dict(int(ref["seed"]))
    np.testing.assert_array_equal(
        reference.fingerprint(sd), ref["fingerprint"], "not the recorded weights: record again"
    )
    checks = reference.compare(sd, ref)
    assert not reference.failures(checks), checks
    # The reference holds what the comparison needs to be strict: a NaN CAM, centres that
    # differ between the modalities and between samples.
    assert np.isnan(ref["cam_b"]).any()
    assert (ref["given_idx1"] != ref["given_idx2"]).any()
    assert (
        len({tuple(c) for c in ref["idx2"]}) > 1 and len({tuple(c) for c in ref["given_idx1"]}) > 1
    )


def test_predict_matches_pytorch_live():
    pytest.importorskip("torch")
    from parity import famf_torch_parity

    checks, _ = famf_torch_parity.run(argparse.Namespace(size=32, batch=3, seed=6, record=False))
    assert not reference.failures(checks), checks
