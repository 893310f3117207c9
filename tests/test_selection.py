"""The OoD rule and QC-based candidate selection (pure functions of the candidates' scores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcloop.monitor.method.selection import (
    Selection,
    apply_selection,
    best_values,
    is_ood,
    select_candidate,
)
from qcloop.plugins.thresholds import Fences


def make_fences(pdc_low: float = 0.7, phd_high: float = 10.0) -> Fences:
    """Hand-made fences (not fitted), so the OoD rule is tested on its own."""
    return Fences(
        pdc_low=pdc_low,
        phd_high=phd_high,
        pdc_q1=0.8,
        pdc_q3=0.9,
        pdc_iqr=0.1,
        pdc_spread=0.1,
        phd_q1=4.0,
        phd_q3=6.0,
        phd_iqr=2.0,
        phd_spread=2.0,
        k=1.5,
        n_used=20,
        n_excluded_penalised=0,
        population="reference",
        pdc_degenerate=False,
        phd_degenerate=False,
        low_confidence=False,
        pdc_low_clamped=False,
    )


# --------------------------------------------------------------------------- is_ood


@pytest.mark.parametrize(
    ("pdc", "phd", "expected"),
    [
        ([0.5, 0.9, 0.6], [5.0, 12.0, 11.0], True),  # every candidate fails one fence
        ([0.5, 0.9, 0.6], [5.0, 5.0, 11.0], False),  # candidate 1 passes both
        ([0.8, 0.9, 0.75], [5.0, 6.0, 9.0], False),  # none fails
        ([0.7, 0.9], [10.0, 10.5], False),  # on the fences is inside (strict comparisons)
        ([0.69], [3.0], True),  # a single candidate below pdc_low
    ],
)
def test_is_ood_needs_every_candidate_outside(pdc, phd, expected: bool) -> None:
    assert is_ood(pdc, phd, make_fences()) is expected


# --------------------------------------------------------------------------- select_candidate


def test_first_by_pdc_qualifies() -> None:
    sel = select_candidate([0.7, 0.9, 0.8], [5.0, 6.0, 7.0], 10.0)
    assert (sel.kind, sel.index, sel.indices) == ("candidate", 1, None)
    assert "candidate 1" in sel.reason and "rank 1" in sel.reason


def test_first_fails_phd_so_second_is_chosen() -> None:
    sel = select_candidate([0.7, 0.9, 0.8], [5.0, 12.0, 7.0], 10.0)
    assert (sel.kind, sel.index) == ("candidate", 2)
    assert "rank 2" in sel.reason


def test_phd_equal_to_fence_does_not_qualify() -> None:
    sel = select_candidate([0.9, 0.8], [10.0, 9.99], 10.0)
    assert sel.index == 1


def test_none_qualifies_averages_best_pdc_and_best_phd() -> None:
    sel = select_candidate([0.7, 0.9, 0.8], [11.0, 15.0, 12.0], 10.0)
    assert (sel.kind, sel.index, sel.indices) == ("average", None, (1, 0))
    assert "averaging" in sel.reason


def test_none_qualifies_and_same_best_gives_that_candidate() -> None:
    sel = select_candidate([0.9, 0.7], [11.0, 15.0], 10.0)
    assert (sel.kind, sel.index, sel.indices) == ("candidate", 0, None)
    assert "both" in sel.reason


def test_pdc_ties_break_on_lower_phd_then_order() -> None:
    assert select_candidate([0.8, 0.8, 0.8], [9.0, 5.0, 5.0], 10.0).index == 1
    assert select_candidate([0.8, 0.8], [5.0, 5.0], 10.0).index == 0


def test_phd_ties_break_on_higher_pdc_then_order() -> None:
    # Best pHD is tied between candidates 1 and 2; candidate 2 has the higher pDC.
    sel = select_candidate([0.9, 0.5, 0.6], [20.0, 12.0, 12.0], 10.0)
    assert sel.indices == (0, 2)
    # Full tie on pHD and pDC: the earlier candidate.
    sel = select_candidate([0.9, 0.6, 0.6], [20.0, 12.0, 12.0], 10.0)
    assert sel.indices == (0, 1)


def test_selection_is_pure() -> None:
    pdc, phd = [0.7, 0.9, 0.8], [5.0, 12.0, 7.0]
    first = select_candidate(pdc, phd, 10.0)
    select_candidate([0.1, 0.2], [50.0, 40.0], 10.0)  # other case in between
    select_candidate([0.99], [1.0], 2.0)
    again = select_candidate(pdc, phd, 10.0)
    assert first == again
    assert pdc == [0.7, 0.9, 0.8] and phd == [5.0, 12.0, 7.0]  # inputs untouched
    assert select_candidate(np.array(pdc), np.array(phd), np.float64(10.0)) == first


def test_selection_to_dict_is_json() -> None:
    sel = select_candidate([0.7, 0.9], [11.0, 15.0], 10.0)
    data = json.loads(json.dumps(sel.to_dict()))
    assert data["kind"] == "average" and data["indices"] == [1, 0] and data["index"] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "candidate"},
        {"kind": "candidate", "index": -1},
        {"kind": "candidate", "index": 0, "indices": (0, 1)},
        {"kind": "average", "indices": (1, 1)},
        {"kind": "average", "index": 0, "indices": (0, 1)},
        {"kind": "average"},
        {"kind": "best"},
        {"kind": "candidate", "index": 1.5},
    ],
)
def test_invalid_selection_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Selection(**kwargs)


def test_selection_accepts_numpy_indices() -> None:
    sel = Selection(kind="average", indices=(np.int64(2), np.int64(0)))
    assert sel.indices == (2, 0) and type(sel.indices[0]) is int


# --------------------------------------------------------------------------- apply_selection


def test_apply_selection_candidate_returns_a_copy_of_that_map() -> None:
    maps = [np.full((4, 8, 8), v, dtype=np.float32) for v in (0.1, 0.25, 0.4)]
    out = apply_selection(Selection(kind="candidate", index=1), maps)
    np.testing.assert_array_equal(out, np.full((4, 8, 8), 0.25, dtype=np.float32))
    out[...] = 0.0
    assert float(maps[1][0, 0, 0]) == 0.25


def test_apply_selection_average_is_the_mean_of_two_maps() -> None:
    a = np.zeros((4, 2, 2), dtype=np.float32)
    b = np.zeros((4, 2, 2), dtype=np.float32)
    a[1], b[3] = 1.0, 1.0  # two confident but different masks
    a[0, 0, 0], a[1, 0, 0] = 0.6, 0.4
    maps = [np.full((4, 2, 2), 0.25, dtype=np.float32), a, b]
    out = apply_selection(Selection(kind="average", indices=(1, 2)), maps)
    expected = np.zeros((4, 2, 2), dtype=np.float32)
    expected[1], expected[3] = 0.5, 0.5
    expected[0, 0, 0], expected[1, 0, 0] = 0.3, 0.2
    np.testing.assert_allclose(out, expected, atol=1e-7)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-6)  # still a softmax map


def test_apply_selection_validates() -> None:
    maps = [np.zeros((4, 2, 2)), np.zeros((4, 3, 3))]
    with pytest.raises(ValueError, match="only 2 maps"):
        apply_selection(Selection(kind="candidate", index=2), maps)
    with pytest.raises(ValueError, match="different shapes"):
        apply_selection(Selection(kind="average", indices=(0, 1)), maps)
    with pytest.raises(ValueError, match="no candidate"):
        apply_selection(Selection(kind="candidate", index=0), [])


# --------------------------------------------------------------------------- best_values


def test_best_values_are_max_pdc_and_min_phd() -> None:
    assert best_values([0.7, 0.9, 0.8], [5.0, 12.0, 3.5]) == (0.9, 3.5)
    assert best_values([0.4], [7.0]) == (0.4, 7.0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("pdc", "phd", "message"),
    [
        ([], [], "no candidates"),
        ([0.5, 0.6], [1.0], "2 pDC and 1 pHD"),
        ([0.5, float("nan")], [1.0, 2.0], "pDC of candidate 1 is nan"),
        ([0.5, 0.6], [float("inf"), 2.0], "pHD of candidate 0 is inf"),
    ],
)
def test_invalid_scores_raise_everywhere(pdc, phd, message: str) -> None:
    for call in (
        lambda: is_ood(pdc, phd, make_fences()),
        lambda: select_candidate(pdc, phd, 10.0),
        lambda: best_values(pdc, phd),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_non_finite_fence_raises() -> None:
    with pytest.raises(ValueError, match="phd_high"):
        select_candidate([0.5], [1.0], float("nan"))


# --------------------------------------------------------------------------- properties

candidates = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([0.0, 0.3, 0.5, 0.8, 0.9, 1.0]), min_size=n, max_size=n),
        st.lists(st.sampled_from([0.0, 2.0, 5.0, 10.0, 30.0]), min_size=n, max_size=n),
    )
)


@settings(max_examples=300, deadline=None)
@given(scores=candidates, phd_high=st.sampled_from([1.0, 5.0, 10.0, 20.0]))
def test_selection_properties(scores, phd_high: float) -> None:
    pdc, phd = scores
    sel = select_candidate(pdc, phd, phd_high)
    qualifying = [i for i in range(len(pdc)) if phd[i] < phd_high]
    if qualifying:
        # The chosen one qualifies and no qualifying candidate beats it on pDC.
        assert sel.kind == "candidate"
        assert phd[sel.index] < phd_high
        assert pdc[sel.index] == max(pdc[i] for i in qualifying)
    elif sel.kind == "candidate":
        # Nobody qualifies: only the candidate best on both pDC and pHD may stand alone.
        assert pdc[sel.index] == max(pdc) and phd[sel.index] == min(phd)
    else:
        i, j = sel.indices
        assert pdc[i] == max(pdc) and phd[j] == min(phd) and i != j
        # Averaging only happens when no single candidate is best on both.
        assert not any(pdc[c] == max(pdc) and phd[c] == min(phd) for c in range(len(pdc)))
    assert select_candidate(pdc, phd, phd_high) == sel
