"""The ``iqr`` threshold strategy: fence arithmetic, robustness rules, serialisation, registration."""

from __future__ import annotations

import json
import math
import statistics

import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcloop.monitor.core import hookspecs
from qcloop.plugins import thresholds
from qcloop.plugins.thresholds import Fences, IQRThresholds

PDC5 = [0.5, 0.6, 0.7, 0.8, 0.9]  # Q1 0.6, Q3 0.8, IQR 0.2 (linear interpolation)
PHD5 = [2.0, 4.0, 6.0, 8.0, 10.0]  # Q1 4, Q3 8, IQR 4 mm


def test_fences_on_hand_computed_quartiles() -> None:
    fences = IQRThresholds().fit(PDC5, PHD5)
    assert fences.pdc_q1 == pytest.approx(0.6)
    assert fences.pdc_q3 == pytest.approx(0.8)
    assert fences.pdc_iqr == pytest.approx(0.2)
    assert fences.pdc_low == pytest.approx(0.6 - 1.5 * 0.2)
    assert fences.phd_q1 == pytest.approx(4.0)
    assert fences.phd_q3 == pytest.approx(8.0)
    assert fences.phd_high == pytest.approx(8.0 + 1.5 * 4.0)
    assert fences.n_used == 5
    assert fences.n_excluded_penalised == 0
    assert not (fences.pdc_degenerate or fences.phd_degenerate or fences.low_confidence)
    assert not fences.pdc_low_clamped
    assert fences.population == "reference"


def test_quartiles_interpolate_linearly_and_ignore_input_order() -> None:
    # n = 4: Q1 sits at position 0.75, Q3 at 2.25 of the sorted values.
    pdc = [0.4, 0.1, 0.3, 0.2]  # sorted 0.1 0.2 0.3 0.4 -> Q1 0.175, Q3 0.325
    phd = [30.0, 10.0, 20.0, 40.0]  # sorted 10 20 30 40 -> Q1 17.5, Q3 32.5
    fences = IQRThresholds().fit(pdc, phd)
    assert fences.pdc_q1 == pytest.approx(0.175)
    assert fences.pdc_q3 == pytest.approx(0.325)
    assert fences.phd_q1 == pytest.approx(17.5)
    assert fences.phd_q3 == pytest.approx(32.5)
    assert fences.phd_high == pytest.approx(32.5 + 1.5 * 15.0)
    assert not fences.low_confidence


@pytest.mark.parametrize(("k", "pdc_low", "phd_high"), [(1.0, 0.4, 12.0), (3.0, 0.001, 20.0)])
def test_k_is_configurable(k: float, pdc_low: float, phd_high: float) -> None:
    fences = IQRThresholds(k=k).fit(PDC5, PHD5)
    assert fences.k == k
    assert fences.pdc_low == pytest.approx(pdc_low)
    assert fences.phd_high == pytest.approx(phd_high)


def test_is_outlier_uses_strict_comparisons() -> None:
    fences = IQRThresholds().fit(PDC5, PHD5)  # pdc_low 0.3, phd_high 14
    assert not fences.is_outlier(0.3, 14.0)
    assert fences.is_outlier(0.29, 5.0)
    assert fences.is_outlier(0.9, 14.01)
    assert not fences.is_outlier(0.95, 0.0)
    with pytest.raises(ValueError, match="finite"):
        fences.is_outlier(float("nan"), 5.0)


def test_degenerate_iqr_uses_the_floor() -> None:
    fences = IQRThresholds().fit([0.9] * 10, [5.0] * 10)
    assert fences.pdc_degenerate and fences.phd_degenerate
    assert fences.pdc_iqr == 0.0
    assert fences.pdc_spread == pytest.approx(0.01)
    assert fences.pdc_low == pytest.approx(0.9 - 1.5 * 0.01)
    assert fences.phd_high == pytest.approx(5.0 + 1.5 * 1.0)
    # A hair below the quartile is not flagged; far below is.
    assert not fences.is_outlier(0.895, 5.0)
    assert not fences.is_outlier(0.89, 5.5)
    assert fences.is_outlier(0.5, 5.0)
    assert fences.is_outlier(0.9, 10.0)


def test_small_iqr_below_floor_is_degenerate() -> None:
    fences = IQRThresholds(min_iqr_phd_mm=2.0).fit(
        [0.80, 0.81, 0.82, 0.83, 0.84], [5.0, 5.1, 5.2, 5.3, 5.4]
    )
    assert fences.pdc_degenerate is False  # IQR 0.02 >= 0.01
    assert fences.phd_degenerate is True  # IQR 0.2 < 2.0
    assert fences.phd_high == pytest.approx(5.3 + 1.5 * 2.0)


def test_penalised_cases_are_excluded_from_quartiles_but_flagged() -> None:
    pdc = [*PDC5, 0.0, 0.0]
    phd = [*PHD5, 350.0, 350.0]
    penalised = [False] * 5 + [True, True]
    fences = IQRThresholds().fit(pdc, phd, penalised)
    clean = IQRThresholds().fit(PDC5, PHD5)
    assert fences.n_excluded_penalised == 2
    assert fences.n_used == 5
    assert fences.pdc_low == pytest.approx(clean.pdc_low)
    assert fences.phd_high == pytest.approx(clean.phd_high)
    assert fences.is_outlier(0.0, 350.0)
    # Without the exclusion the penalties would pull the quartiles (sanity of the test itself).
    assert IQRThresholds().fit(pdc, phd).phd_q3 > clean.phd_q3


def test_zero_overlap_is_flagged_even_when_tukey_fence_is_negative() -> None:
    pdc = [0.05, 0.3, 0.6, 0.95]  # Q1 0.2375, Q3 0.6875 -> Tukey low -0.4375
    phd = [1.0, 2.0, 3.0, 400.0]  # a huge spread: the pHD fence alone would not flag 200 mm
    fences = IQRThresholds().fit(pdc, phd)
    assert fences.pdc_low_clamped
    assert fences.pdc_low == pytest.approx(1e-3)
    assert fences.phd_high == pytest.approx(102.25 + 1.5 * 100.5)
    assert fences.is_outlier(0.0, 200.0)
    assert not fences.is_outlier(0.05, 1.0)
    plain = IQRThresholds(min_pdc_low=0.0).fit(pdc, phd)
    assert plain.pdc_low == pytest.approx(-0.4375)
    assert not plain.is_outlier(0.0, 200.0)


def test_few_values_give_low_confidence_wider_fences() -> None:
    fences = IQRThresholds().fit([0.8, 0.85, 0.9], [4.0, 5.0, 6.0])
    assert fences.low_confidence
    # IQR 0.05 is replaced by the range 0.1; pHD IQR 1 by the range 2.
    assert fences.pdc_spread == pytest.approx(0.1)
    assert fences.pdc_low == pytest.approx(0.825 - 0.15)
    assert fences.phd_high == pytest.approx(5.5 + 3.0)
    single = IQRThresholds().fit([0.9], [5.0])
    assert single.low_confidence and single.n_used == 1
    assert single.pdc_low == pytest.approx(0.885)
    assert single.phd_high == pytest.approx(6.5)
    # Penalised cases do not count towards confidence.
    mixed = IQRThresholds().fit([0.8, 0.9, 0.0, 0.0], [5.0, 6.0, 99.0, 99.0])
    assert not mixed.low_confidence  # no flags given: all four are used
    flagged = IQRThresholds().fit(
        [0.8, 0.9, 0.0, 0.0], [5.0, 6.0, 99.0, 99.0], [False, False, True, True]
    )
    assert flagged.low_confidence and flagged.n_used == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["pdc", "phd"])
def test_non_finite_scores_are_rejected(bad: float, which: str) -> None:
    pdc, phd = list(PDC5), list(PHD5)
    (pdc if which == "pdc" else phd)[2] = bad
    name = "pDC" if which == "pdc" else "pHD"
    with pytest.raises(ValueError, match=rf"{name}\[2\] is (nan|inf|-inf)"):
        IQRThresholds().fit(pdc, phd)


def test_non_finite_penalty_is_rejected_too() -> None:
    with pytest.raises(ValueError, match=r"pHD\[5\] is inf"):
        IQRThresholds().fit([*PDC5, 0.0], [*PHD5, math.inf], [False] * 5 + [True])


@pytest.mark.parametrize(
    ("pdc", "phd", "penalised", "message"),
    [
        ([], [], None, "empty"),
        ([0.5, 0.6], [1.0], None, "2 values but pHD has 1"),
        ([0.0, 0.0], [9.0, 9.0], [True, True], "all 2 case"),
        ([0.5, 0.6], [1.0, 2.0], [True], "one flag per case"),
        ([0.5, 0.6], [1.0, 2.0], [1, 0], "booleans"),
        ([0.5, 1.2], [1.0, 2.0], None, r"\[0, 1\]"),
        ([0.5, 0.6], [-1.0, 2.0], None, ">= 0 mm"),
        ([[0.5], [0.6]], [1.0, 2.0], None, "1-D"),
    ],
)
def test_invalid_inputs_raise(pdc, phd, penalised, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IQRThresholds().fit(pdc, phd, penalised)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0.0},
        {"k": float("nan")},
        {"min_iqr_pdc": -0.1},
        {"min_iqr_phd_mm": float("inf")},
        {"min_pdc_low": 1.0},
        {"population": "everything"},
    ],
)
def test_invalid_parameters_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        IQRThresholds(**kwargs)


def test_population_is_recorded() -> None:
    fences = IQRThresholds(population="transductive").fit(PDC5, PHD5)
    assert fences.population == "transductive"


def test_to_dict_from_dict_round_trip_through_json() -> None:
    fences = IQRThresholds(k=2.0, population="transductive").fit(
        [*PDC5, 0.0], [*PHD5, 300.0], [False] * 5 + [True]
    )
    text = json.dumps(fences.to_dict(), allow_nan=False)
    restored = Fences.from_dict(json.loads(text))
    assert restored == fences
    assert restored.to_dict() == fences.to_dict()
    assert isinstance(restored.n_used, int) and isinstance(restored.low_confidence, bool)


def test_from_dict_rejects_bad_data() -> None:
    data = IQRThresholds().fit(PDC5, PHD5).to_dict()
    with pytest.raises(ValueError, match="missing keys"):
        Fences.from_dict({k: v for k, v in data.items() if k != "phd_high"})
    with pytest.raises(ValueError, match="unknown keys"):
        Fences.from_dict({**data, "extra": 1})
    for bad in (float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="pdc_low"):
            Fences.from_dict({**data, "pdc_low": bad})
    with pytest.raises(ValueError, match="at least one"):
        Fences.from_dict({**data, "n_used": 0})
    with pytest.raises(ValueError, match="population"):
        Fences.from_dict({**data, "population": "other"})


def test_registration_through_pluggy() -> None:
    pm = pluggy.PluginManager("qcloop")
    pm.add_hookspecs(hookspecs)
    pm.register(thresholds)
    registry: dict[str, object] = {}
    pm.hook.register_threshold_strategies(register=registry.__setitem__)
    assert registry == {"iqr": IQRThresholds}
    strategy = registry["iqr"](**{"k": 3.0, "population": "transductive"})
    assert isinstance(strategy, IQRThresholds) and strategy.k == 3.0
    pm.check_pending()


scores = st.lists(
    st.tuples(
        st.floats(0.0, 1.0, allow_nan=False),
        st.floats(0.0, 500.0, allow_nan=False),
        st.booleans(),
    ),
    min_size=1,
    max_size=30,
).filter(lambda rows: not all(p for _, _, p in rows))


@settings(max_examples=150, deadline=None)
@given(rows=scores, k=st.sampled_from([0.5, 1.5, 3.0]))
def test_fences_match_stdlib_quartiles_and_stay_finite(rows, k: float) -> None:
    pdc = [r[0] for r in rows]
    phd = [r[1] for r in rows]
    penalised = [r[2] for r in rows]
    fences = IQRThresholds(k=k).fit(pdc, phd, penalised)
    used_pdc = [d for d, p in zip(pdc, penalised, strict=True) if not p]
    used_phd = [h for h, p in zip(phd, penalised, strict=True) if not p]
    assert all(math.isfinite(v) for v in fences.to_dict().values() if isinstance(v, float))
    json.dumps(fences.to_dict(), allow_nan=False)
    if len(used_pdc) >= 2:
        # statistics' "inclusive" method is the same linear interpolation as numpy's default.
        q1, _, q3 = statistics.quantiles(used_pdc, n=4, method="inclusive")
        assert fences.pdc_q1 == pytest.approx(q1, abs=1e-12)
        assert fences.pdc_q3 == pytest.approx(q3, abs=1e-12)
        h1, _, h3 = statistics.quantiles(used_phd, n=4, method="inclusive")
        assert fences.phd_high == pytest.approx(h3 + k * fences.phd_spread, abs=1e-9)
        assert fences.phd_spread >= max(h3 - h1, 1.0) - 1e-9
    # Fences never collapse: nothing within the middle half of pHD is flagged on pHD, and
    # zero overlap is always an outlier.
    assert fences.phd_high >= fences.phd_q3 + k * 1.0 - 1e-9
    assert fences.is_outlier(0.0, 0.0)
