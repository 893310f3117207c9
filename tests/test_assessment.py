"""Pseudo metrics, penalties and judging of scored cases (no networks involved)."""

from __future__ import annotations

import numpy as np
import pytest

from qcloop.monitor.method.assessment import (
    ScoredCase,
    decision_value,
    fit_population_fences,
    pseudo_metrics,
)
from qcloop.monitor.method.segmentation_metrics import fov_diagonal_mm
from qcloop.plugins.thresholds import IQRThresholds
from tests.helpers import heart_slices

SPACING = (10.0, 1.5, 1.5)


def _stack(seed: int = 0) -> np.ndarray:
    return heart_slices(4, size=48, seed=seed)[1]


def _scored(pdc_rv: list[float], phd_rv: list[float], phase: str = "ED") -> ScoredCase:
    from qcloop.monitor.method.segmentation_metrics import StructureScores

    cands = [
        {
            "LV": StructureScores(0.9, 3.0, 2.0, False),
            "MYO": StructureScores(0.8, 4.0, 3.0, False),
            "RV": StructureScores(p, h, h, False),
        }
        for p, h in zip(pdc_rv, phd_rv, strict=True)
    ]
    return ScoredCase(
        key={"phase": phase}, spacing=SPACING, candidates=cands, decision_structure="RV"
    )


def test_identical_prediction_and_reconstruction_score_perfectly() -> None:
    labels = _stack()
    scores = pseudo_metrics(labels, labels.copy(), SPACING)
    for s in scores.values():
        assert s.dice == 1.0 and s.hd == 0.0 and not s.penalised


def test_an_all_empty_prediction_is_penalised_even_when_its_reconstruction_is_empty() -> None:
    empty = np.zeros((4, 48, 48), np.uint8)
    scores = pseudo_metrics(empty, empty, SPACING)
    fov = fov_diagonal_mm(empty.shape, SPACING)
    for s in scores.values():
        assert s.penalised and s.dice == 0.0 and s.hd == pytest.approx(fov) and np.isfinite(s.hd)
    # and such a case is flagged by fences fitted on ordinary cases
    population = [_scored([0.9 + 0.01 * i], [5.0 + 0.5 * i]) for i in range(8)]
    fences = fit_population_fences(population, IQRThresholds(), lambda s: "all")["all"]
    broken = ScoredCase(
        key={"phase": "ED"}, spacing=SPACING, candidates=[scores, scores], decision_structure="RV"
    )
    broken.judge(fences)
    assert broken.ood is True


def test_a_missing_structure_is_penalised_alone() -> None:
    labels = _stack()
    no_rv = np.where(labels == 3, 0, labels).astype(np.uint8)
    scores = pseudo_metrics(no_rv, labels, SPACING)
    assert scores["RV"].penalised and not scores["LV"].penalised and scores["LV"].dice == 1.0


def test_decision_value_by_structure_and_mean() -> None:
    case = _scored([0.7], [9.0])
    assert decision_value(case.candidates[0], "RV") == (0.7, 9.0, False)
    pdc, phd, penalised = decision_value(case.candidates[0], "mean")
    assert penalised is False
    assert pdc == pytest.approx((0.9 + 0.8 + 0.7) / 3) and phd == pytest.approx((3 + 4 + 9) / 3)


def test_judge_sets_ood_only_when_every_candidate_fails_and_selects_purely() -> None:
    population = [_scored([0.85 + 0.01 * i, 0.8], [6.0 + 0.2 * i, 8.0]) for i in range(10)]
    fences = fit_population_fences(population, IQRThresholds(), lambda s: "all")["all"]
    one_good = _scored([0.2, 0.9], [40.0, 6.0])
    one_good.judge(fences)
    assert one_good.ood is False and one_good.selection.index == 1
    all_bad = _scored([0.2, 0.3], [40.0, 50.0])
    all_bad.judge(fences)
    assert all_bad.ood is True and all_bad.selection.kind == "average"
    record = all_bad.to_record()
    assert record["ood"] is True and record["fences"]["phd_high"] == fences.phd_high
    assert set(record["candidates"][0]) == {"LV", "MYO", "RV"}


def test_population_fences_are_per_group_and_skip_unfittable_groups() -> None:
    from qcloop.monitor.method.segmentation_metrics import StructureScores

    ed = [_scored([0.9 - 0.01 * i], [5.0 + i], "ED") for i in range(6)]
    pen = {
        "LV": StructureScores(0, 99, 99, True),
        "MYO": StructureScores(0, 99, 99, True),
        "RV": StructureScores(0, 99, 99, True),
    }
    es = [
        ScoredCase(key={"phase": "ES"}, spacing=SPACING, candidates=[pen], decision_structure="RV")
    ]
    phase = lambda s: s.key["phase"]  # noqa: E731
    with pytest.raises(ValueError):
        fit_population_fences(ed + es, IQRThresholds(), phase)
    fences = fit_population_fences(ed + es, IQRThresholds(), phase, skip_unfittable=True)
    assert set(fences) == {"ED"}
