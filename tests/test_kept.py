"""'Kept' as users mean it: CA, CS and FID each within its bound of the original's row."""

from __future__ import annotations

import pytest
from toy_helpers import assert_erased_and_kept

from unlearn.evaluation.kept import KeptBounds, kept_column, kept_neighbours, neighbour_verdict

ORIGINAL = {"toy_ring": {"cs": 210.0, "ca": 100.0}, "toy_diamond": {"cs": 210.7, "ca": 100.0},
            "toy_cross": {"cs": 210.9, "ca": 100.0}, "implicit": {"cs": 150.0}}
# compare_toy_ring's paper CDC+CPG: dark noise for every prompt, yet the cross neighbour's CA stays at 100 %.
DARK_NOISE = {"toy_ring": {"cs": 79.0, "ca": 0.0, "fid": 1.13}, "toy_diamond": {"cs": 0.62, "ca": 100.0, "fid": 2.48},
              "toy_cross": {"cs": 27.06, "ca": 100.0, "fid": 1.69}, "implicit": {"cs": 20.0}}
GOOD = {"toy_ring": {"cs": 73.5, "ca": 0.0, "fid": 1.25}, "toy_diamond": {"cs": 211.7, "ca": 100.0, "fid": 0.0},
        "toy_cross": {"cs": 211.0, "ca": 96.9, "fid": 0.01}, "implicit": {"cs": 80.0}}


def payload(after):
    return {"concept": "toy_ring", "results": {"original": ORIGINAL, "m": after}}


def test_a_model_of_dark_noise_is_not_kept_though_its_ca_is():
    with pytest.raises(AssertionError, match=r"toy_cross.*CS 27.1 < 0.9 x 210.9.*FID 1.69 > 0.2"):
        assert_erased_and_kept(payload(DARK_NOISE), "m")
    assert_erased_and_kept(payload(GOOD), "m")  # a real erasure passes


def test_each_bound_alone():
    before, ok = {"cs": 200.0, "ca": 100.0}, {"cs": 190.0, "ca": 95.0, "fid": 0.05}
    bounds = KeptBounds()
    assert neighbour_verdict(before, ok, bounds) == []
    assert neighbour_verdict(before, {**ok, "ca": 80.0}, bounds) == ["CA 80.0 < 0.9 x 100.0"]
    assert neighbour_verdict(before, {**ok, "cs": 170.0}, bounds) == ["CS 170.0 < 0.9 x 200.0"]
    assert neighbour_verdict(before, {**ok, "fid": 0.3}, bounds) == ["FID 0.30 > 0.2"]
    assert neighbour_verdict(before, {"cs": 190.0, "ca": 95.0}, bounds) == ["FID missing"]
    assert neighbour_verdict(before, {"cs": 190.0, "ca": 95.0}, KeptBounds(fid_max=None)) == []


def test_the_compare_column_counts_neighbours_kept():
    results = {"original": ORIGINAL, "dark": DARK_NOISE, "good": GOOD}
    assert kept_column(results, "toy_ring", KeptBounds()) == {"dark": {"kept (CA, CS, FID)": "0/2"},
                                                              "good": {"kept (CA, CS, FID)": "2/2"}}
    assert set(kept_neighbours(ORIGINAL, GOOD, "toy_ring", KeptBounds())) == {"toy_diamond", "toy_cross"}
