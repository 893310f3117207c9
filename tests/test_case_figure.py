"""The per-case QC figure: which slices it shows, what it says, and that assess/predict write
one per flagged case (or per case) beside the records."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.report.case_figure import (
    case_figure_png,
    disagreement_slices,
    flag_reason,
    wants_figure,
)


def _record(ood: bool | None) -> dict:
    scores = {"pdc": 0.62, "phd_mm": 14.5, "phd95_mm": 9.0, "penalised": False}
    return {
        "subject": "007",
        "view": "SA",
        "phase": "ED",
        "decision_structure": "RV",
        "candidates": [{s: dict(scores) for s in ("LV", "MYO", "RV")}],
        "fences": {"pdc_low": 0.7, "phd_high": 12.0},
        "ood": ood,
        "selection": {"kind": "candidate", "index": 0},
    }


def _stack() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, 64, 64)).astype(np.float32)
    pred = np.zeros((5, 64, 64), np.int64)
    pred[:, 20:40, 20:40] = 3
    pred[:, 26:34, 26:34] = 1
    recon = pred.copy()
    recon[3, 20:40, 20:30] = 0  # slice 3 disagrees most, then slice 1
    recon[1, 20:25, 20:40] = 0
    pred[0] = recon[0] = 0  # an empty slice is never chosen while others have foreground
    return image, pred, recon


def test_the_most_disagreeing_slices_are_shown_in_slice_order() -> None:
    _, pred, recon = _stack()
    assert disagreement_slices(pred, recon, 2) == [1, 3]
    assert disagreement_slices(pred, recon, 10) == [1, 2, 3, 4]  # slice 0 is empty
    empty = np.zeros_like(pred)
    assert disagreement_slices(empty, empty, 3) == [0]


def test_the_reason_names_the_fences_and_every_candidate() -> None:
    reason = flag_reason(_record(True))
    assert reason.startswith("flagged OoD: every candidate has RV pDC < 0.70 or pHD > 12.0 mm")
    assert "pDC 0.62, pHD 14.5 mm" in reason
    assert flag_reason(_record(False)).startswith("in distribution: a candidate has RV pDC >= 0.70")
    assert flag_reason(_record(None)).startswith("not judged")
    assert wants_figure("flagged", True) and not wants_figure("flagged", False)
    assert wants_figure("all", None) and not wants_figure("none", True)
    with pytest.raises(ValueError, match="--figures"):
        wants_figure("some", True)


def test_the_figure_is_a_png_showing_the_disagreement() -> None:
    from matplotlib.image import imread

    image, pred, recon = _stack()
    png = case_figure_png(image, pred, recon, _record(True))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(io.BytesIO(png))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600  # 4 panels wide, rows for 3 slices
    magenta = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.4) & (pixels[..., 2] > 0.8)
    assert magenta.sum() > 100  # the disagreement panel is drawn
    assert magenta[:, : pixels.shape[1] // 2].sum() == 0  # only in the last column
    with pytest.raises(ValueError, match="one shape"):
        case_figure_png(image, pred[:4], recon, _record(True))


def test_predict_writes_a_figure_per_flagged_case(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """(``all`` and ``none`` differ only in :func:`wants_figure`, tested above.)"""
    choice = "flagged"
    out = tmp_path / "out"
    args = ["predict", "--data", str(tiny_cohort), "--run", str(tiny_run), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--view", "SA", "--figures", choice])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    drawn = [r for r in records if "figure" in r]
    expected = [r for r in records if r["ood"]]
    assert expected and len(expected) < len(records)  # the test tells flagged from all
    assert [r["subject"] + r["phase"] for r in drawn] == [
        r["subject"] + r["phase"] for r in expected
    ]
    for r in drawn:
        assert Path(r["figure"]).read_bytes()[:4] == b"\x89PNG"
    figures = sorted((out / "figures").glob("*")) if (out / "figures").exists() else []
    assert len(figures) == len(drawn) and not [f for f in figures if f.name.startswith(".")]


def test_figures_are_refused_for_masks_scored_from_elsewhere(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    args = ["assess", "--data", str(tiny_cohort), "--run", str(tiny_run), "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, [*args, "--predictions", str(tmp_path), "--figures", "all"])
    assert result.exit_code == 2 and "--figures" in result.output
