"""The demo's ablation tables: mean and median HD, missing-structure counts, and rebuilding the
tables from evaluations.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcloop.monitor.method.evaluation import (
    CaseEvaluation,
    ablation_markdown,
    ablation_tables,
    evaluations_from_jsonl,
)


def _scores(rv_dice: float, rv_hd: float, missing: bool = False) -> dict:
    ok = {"dice": 0.9, "hd": 5.0, "hd95": 3.0, "missing": False}
    return {
        "RV": {"dice": rv_dice, "hd": rv_hd, "hd95": rv_hd, "missing": missing},
        "LV": ok,
        "MYO": ok,
    }


def _case(i: int, m: dict, sel: dict) -> CaseEvaluation:
    key = {
        "subject": f"{i:03d}",
        "view": "LA",
        "phase": "ED",
        "vendor": "B",
        "image": f"{i}.nii.gz",
    }
    pseudo = {s: {"pdc": 0.5 + 0.1 * i, "phd": 10.0 - i} for s in ("RV", "LV", "MYO")}
    return CaseEvaluation(key=key, ood=i == 0, true_m=m, true_selected=sel, pseudo_m=pseudo)


def test_median_and_missing_separate_a_penalised_case_from_the_rest() -> None:
    base = [_case(i, _scores(0.8, 10.0 + i), _scores(0.8, 10.0 + i)) for i in range(3)]
    # refinement improves two cases and loses the RV of the third: mean HD explodes, median drops
    full = [
        _case(0, _scores(0.0, 400.0, missing=True), _scores(0.0, 400.0, missing=True)),
        _case(1, _scores(0.85, 6.0), _scores(0.85, 6.0)),
        _case(2, _scores(0.85, 7.0), _scores(0.85, 7.0)),
    ]
    rows = {(r["config"], r["structure"]): r for r in ablation_tables(base, full)["rows"]}
    m, f = rows[("M", "RV")], rows[("full", "RV")]
    assert m["hd_mm"] == pytest.approx(11.0) and m["hd_median_mm"] == 11.0 and m["n_missing"] == 0
    assert f["hd_mm"] == pytest.approx(413 / 3)
    assert f["hd_median_mm"] == 7.0 and f["n_missing"] == 1
    md = ablation_markdown(ablation_tables(base, full), {"command": "test", "seconds": 1})
    assert "| B | LA | RV | 11.00 | 11.00 | 7.00 | 0 | 0 | 1 |" in md


def test_tables_rebuild_from_the_demo_jsonl(tmp_path: Path) -> None:
    base = [_case(i, _scores(0.8, 10.0), _scores(0.82, 9.0)) for i in range(3)]
    full = [_case(i, _scores(0.8, 10.0), _scores(0.9, 4.0)) for i in range(3)]
    path = tmp_path / "evaluations.jsonl"
    path.write_text(
        "".join(json.dumps({"config": "M/M+QC", **e.to_dict()}) + "\n" for e in base)
        + "".join(json.dumps({"config": "full", **e.to_dict()}) + "\n" for e in full)
    )
    b, f = evaluations_from_jsonl(path)
    assert ablation_tables(b, f) == ablation_tables(base, full)
    # records written before the missing flag existed give n/a, never a made-up zero
    legacy = path.read_text().replace(', "missing": false', "")
    path.write_text(legacy)
    rows = ablation_tables(*evaluations_from_jsonl(path))["rows"]
    assert all(r["n_missing"] is None for r in rows)
    path.write_text('{"config": "full", "subject": "1"}\n')
    with pytest.raises(ValueError, match=r"evaluations.jsonl:1: not a demo evaluation record"):
        evaluations_from_jsonl(path)
