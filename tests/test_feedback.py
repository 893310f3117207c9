"""Late ground truth: corrected masks matched to the cases a monitor scored, scored against
the masks that were served, stored as labelled data, exported; bad corrections refused one by
one with nothing stored changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.data import discover
from qcloop.monitor.method.quality_estimate import fit_estimator, save_estimator
from qcloop.monitor.method.segmentation_metrics import compute_metrics
from qcloop.monitor.ops.ledger import JsonlLog
from qcloop.monitor.ops.monitor import Monitor
from qcloop.plugins.calibrators import IsotonicCalibrator
from tests.helpers import biased_records
from tests.monitor_support import champions_of, exporter_samples, monitor_cfg, read_records


def _feedback_events(out: Path) -> list[dict]:
    return [e for e in JsonlLog(out / "ledger.jsonl").read() if e["event"] == "feedback"]


def test_corrections_are_scored_stored_exported_and_bad_ones_refused(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    sources = [s for s in discover(tiny_cohort, views=["SA"]) if s.gt_path is not None][:3]
    inbox.mkdir()
    for s in sources:
        shutil.copy2(s.image_path, inbox / s.image_path.name)
    # a calibrated estimate in the run: records carry est_dice, feedback measures its error
    est = fit_estimator(biased_records(60, 0), {"isotonic": IsotonicCalibrator})
    save_estimator(run_copy / "SA", est)
    cfg = monitor_cfg(run_copy)
    with Monitor(
        inbox, out, cfg, champions_of(run_copy, ("SA",)), settle_s=0, figures="none"
    ) as mon:
        assert mon.step() == 3
        records = {r["source_file"]: r for r in read_records(out)}
        assert all(r["estimate"]["calibrator"] == "isotonic" for r in records.values())
        corrected = out / "corrected"
        corrected.mkdir()
        good = []
        for s in sources[:2]:  # the ground truth arrives late, named by case id
            rec = records[s.image_path.name]
            good.append((rec, s))
            shutil.copy2(s.gt_path, corrected / f"{rec['case_id']}_gt.nii.gz")
        # refused, one by one: an unknown case, another grid, a label outside 0..3
        shutil.copy2(sources[2].gt_path, corrected / "nobody_gt.nii.gz")
        third = records[sources[2].image_path.name]
        img = nib.load(sources[2].gt_path)
        crop = np.asarray(img.dataobj)[:-2]
        nib.save(nib.Nifti1Image(crop, img.affine), corrected / f"{third['case_id']}.nii.gz")
        bad = np.asarray(img.dataobj).copy()
        bad[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(bad, img.affine), corrected / f"{third['sha256']}.nii.gz")
        assert mon.step() == 5
        samples = exporter_samples(mon)
    events = _feedback_events(out)
    assert sorted(e["case_id"] for e in events) == sorted(r["case_id"] for r, _ in good)
    for rec, src in good:
        (event,) = [e for e in events if e["case_id"] == rec["case_id"]]
        served = np.asarray(nib.load(rec["mask"]).dataobj)
        truth = nib.load(src.gt_path)
        expected = compute_metrics(served, np.asarray(truth.dataobj), truth.header.get_zooms()[:3])
        for s in ("LV", "MYO", "RV"):
            assert event["scores"][s]["dice"] == pytest.approx(expected[s].dice)
            assert event["error"][s] == pytest.approx(expected[s].dice - event["scores"][s]["pdc"])
            est_dice = rec["estimate"]["structures"][s]["dice"]
            assert event["est_error"][s] == pytest.approx(expected[s].dice - est_dice)
        assert event["flagged"] == rec["ood"]
        assert event["failed"] == (expected["RV"].dice < 0.8)
    # stored as labelled data for refinement (M&Ms-2 layout, with the image)
    labelled = discover(out / "labelled" / "SA")
    assert len(labelled) == 2 and all(s.gt_path is not None for s in labelled)
    done = sorted(p.name for p in (out / "corrected" / "done").iterdir())
    assert len(done) == 2
    reasons = sorted(p.read_text() for p in (out / "corrected" / "refused").glob("*.reason.txt"))
    assert len(reasons) == 3
    assert any("matches no scored case" in r for r in reasons)
    assert any("differs from the served mask" in r for r in reasons)
    assert any("labels outside 0..3: [7]" in r for r in reasons)
    # the report of the monitor's folder shows realised beside estimated for those cases
    from qcloop.monitor.report.sources import read_source

    rows = {r["id"]: r for r in read_source(out).rows}
    for rec, _ in good:
        event = next(e for e in events if e["case_id"] == rec["case_id"])
        assert rows[rec["case_id"]]["true_dice"] == pytest.approx(event["scores"]["RV"]["dice"])
    counted = sum(v for (name, _), v in samples.items() if name == "qcloop_feedback_total")
    assert counted == 2
    assert samples[("qcloop_pdc_error_count", (("structure", "RV"), ("view", "SA")))] == 2
    assert samples[("qcloop_est_dice_error_count", (("structure", "RV"), ("view", "SA")))] == 2
    assert samples[("qcloop_est_dice_count", (("structure", "RV"), ("view", "SA")))] == 3


def test_the_feedback_command_refuses_a_busy_folder_and_reports_each_mask(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    inbox, out, masks = tmp_path / "inbox", tmp_path / "out", tmp_path / "masks"
    src = next(s for s in discover(tiny_cohort, views=["SA"]) if s.gt_path is not None)
    inbox.mkdir()
    masks.mkdir()
    shutil.copy2(src.image_path, inbox / src.image_path.name)
    cfg = monitor_cfg(run_copy)
    args = ["feedback", "--out", str(out), "--masks", str(masks)]
    with Monitor(
        inbox, out, cfg, champions_of(run_copy, ("SA",)), settle_s=0, figures="none"
    ) as mon:
        mon.step()
        busy = CliRunner().invoke(cli, args)
        assert busy.exit_code == 1 and "corrected" in busy.output
    (rec,) = read_records(out)
    shutil.copy2(src.gt_path, masks / f"{rec['sha256']}.nii.gz")  # by the input's hash
    (masks / "x.nii.gz").write_bytes(b"not nifti")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert f"{rec['case_id']} realised RV Dice" in result.output
    assert "x.nii.gz: refused: matches no scored case" in result.output
    assert len(_feedback_events(out)) == 1


def test_the_monitors_refinement_anchors_on_the_corrected_cases_too(
    run_copy: Path, tiny_cohort: Path, tmp_path: Path, plugin_env: pytest.MonkeyPatch
) -> None:
    """The default refinement of a monitor adds OUT/labelled (the corrected cases) to the
    run's labelled data; a folder with no corrections yet adds nothing."""
    from functools import partial

    from qcloop.monitor.ops.refinement_job import RefinementJob, refine_window

    out = tmp_path / "out"
    labelled = out / "labelled" / "SA"
    src = next(s for s in discover(tiny_cohort, views=["SA"]) if s.gt_path is not None)
    (labelled / "000001").mkdir(parents=True)
    for phase in ("ED", "ES"):  # one corrected subject, as feedback stores it
        image = src.image_path.with_name(src.image_path.name.replace("_ED", f"_{phase}"))
        gt = src.gt_path.with_name(src.gt_path.name.replace("_ED", f"_{phase}"))
        shutil.copy2(image, labelled / "000001" / f"000001_SA_{phase}.nii.gz")
        shutil.copy2(gt, labelled / "000001" / f"000001_SA_{phase}_gt.nii.gz")
    (labelled / "dataset_information.csv").write_text(
        "SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD,SPLIT,CASE_ID\n000001,,A,,,feedback,x\n"
    )
    job = RefinementJob(
        out, None, monitor_cfg(run_copy), registry=None, refinement=None, refine_fn=None,
        gate_fn=None, pm=None,
    )  # type: ignore[arg-type]  # fmt: skip
    assert isinstance(job._refine_fn, partial) and job._refine_fn.func is refine_window
    assert job._refine_fn.keywords == {"extra_labelled": [out / "labelled"]}
    window = tmp_path / "window"  # three subjects of vendor C: a small, shifted window
    rows = (tiny_cohort / "dataset_information.csv").read_text().splitlines()
    keep = [r for r in rows[1:] if ",C," in r][:3]
    window.mkdir()
    for row in keep:
        code = row.split(",")[0]
        shutil.copytree(tiny_cohort / code.zfill(3), window / code.zfill(3))
    (window / "dataset_information.csv").write_text("\n".join([rows[0], *keep]) + "\n")
    cfg = monitor_cfg(run_copy)
    from qcloop.monitor.method.cases import labelled_sources
    from qcloop.monitor.method.refine import default_labelled
    from qcloop.monitor.method.run_folder import read_run_info

    plain = labelled_sources(default_labelled(read_run_info(run_copy)), "SA", cfg.seed)
    more = job._refine_fn(window, run_copy, tmp_path / "r1", "SA", cfg)
    assert more["views"]["SA"]["labelled_cases"] == len(plain) + 2  # the corrected ED and ES
    assert more["labelled"][1] == str((out / "labelled").resolve())
