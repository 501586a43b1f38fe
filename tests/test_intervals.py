"""Intervals over training seeds: the t-interval by hand, the per-cell aggregate, which pairs separate."""

from __future__ import annotations

import math

import pytest

from unlearn.comparison.intervals import aggregate, format_separations, overlap, separations, t_interval

# Student's t quantiles t(0.975, df) from printed tables, independent of scipy.
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}


@pytest.mark.parametrize("values", [[75.0, 37.5], [75.0, 37.5, 50.0], [1.0, 2.0, 3.0, 4.0, 10.0]])
def test_t_interval_by_hand(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    got_mean, got_hw = t_interval(values)
    assert got_mean == pytest.approx(mean)
    assert got_hw == pytest.approx(T975[n - 1] * sd / math.sqrt(n), rel=1e-4)


def test_one_value_has_no_interval_and_none_is_an_error():
    assert t_interval([42.0]) == (42.0, None)
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])


def test_aggregate_keeps_the_shape_and_skips_what_a_seed_lacks():
    seeds = [{"ring": {"ca": 75.0, "cs": 100.0}, "cross": {"ca": 100.0}},
             {"ring": {"ca": 37.5, "cs": 90.0}, "cross": {"ca": 100.0, "fid": 1.0}},
             {"ring": {"ca": 50.0, "cs": 80.0}, "cross": {"ca": 100.0}}]
    means, widths = aggregate(seeds)
    assert means["ring"]["ca"] == pytest.approx(54.1667, rel=1e-4)
    assert widths["ring"]["ca"] == pytest.approx(T975[2] * 19.0941 / math.sqrt(3), rel=1e-3)
    assert (means["cross"], widths["cross"]) == ({"ca": 100.0}, {"ca": 0.0})  # no fid: seed 0 lacks it


def test_overlap():
    assert overlap((10.0, 2.0), (13.0, 1.5))        # [8, 12] and [11.5, 14.5]
    assert not overlap((10.0, 2.0), (14.5, 2.0))    # [8, 12] and [12.5, 16.5]
    assert overlap((10.0, None), (90.0, 1.0))       # one seed: no interval, nothing separates


def test_separations_name_the_pairs_and_the_lower_method():
    def res(ca, neighbour):
        return {"ring": {"ca": ca}, "cross": {"ca": neighbour}, "implicit": {"ca": 0.0}}
    per_method = {"uce": [res(0.0, 100.0), res(3.1, 100.0), res(0.0, 96.9)],
                  "esd_x": [res(43.8, 100.0), res(46.9, 96.9), res(50.0, 100.0)],
                  "conabl": [res(3.1, 100.0), res(0.0, 100.0), res(6.2, 100.0)]}
    rows = {(r["measure"], r["a"], r["b"]): r for r in separations(per_method, "ring")}
    assert rows[("target CA", "uce", "esd_x")]["separate"] and rows[("target CA", "uce", "esd_x")]["lower"] == "uce"
    assert not rows[("target CA", "uce", "conabl")]["separate"]
    assert not rows[("neighbours' mean CA", "uce", "esd_x")]["separate"]  # implicit is not a neighbour
    text = format_separations(list(rows.values()))
    assert "target CA: uce 1.0 ± 4.4 vs esd_x 46.9 ± 7.7: separate (uce lower)" in text
    assert "cannot separate (intervals overlap)" in text


def test_one_seed_ranks_no_pair_and_says_why():
    one = {"a": [{"t": {"ca": 93.8}, "n": {"ca": 100.0}}], "b": [{"t": {"ca": 3.1}, "n": {"ca": 100.0}}]}
    text = format_separations(separations(one, "t"))
    assert "one training seed" in text and "overlap" not in text and "93.8" not in text
    two = [{"t": {"ca": 0.0}, "n": {"ca": 100.0}}, {"t": {"ca": 2.0}, "n": {"ca": 100.0}}]
    mixed = {**one, "c": two, "d": two}
    text = format_separations(separations(mixed, "t"))
    assert "a 93.8 vs c 1.0 ± 12.7: cannot separate (one training seed: no interval)" in text
