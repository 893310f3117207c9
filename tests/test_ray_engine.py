"""``assess`` / ``predict --engine ray``: the same records as the local engine, on a real local
Ray cluster, and no case lost or half-written when a worker actor is killed mid-batch."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

SUBJECTS = ("001", "002", "003", "004", "005", "006")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (2 CPUs, as CI has): the engine joins it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six subjects of the tiny cohort and one image that is not NIfTI (a case that fails)."""
    dst = tmp_path_factory.mktemp("ray-data") / "data"
    dst.mkdir()
    shutil.copy(tiny_cohort / "dataset_information.csv", dst)
    for subject in SUBJECTS:
        shutil.copytree(tiny_cohort / subject, dst / subject)
    bad = dst / SUBJECTS[-1] / f"{SUBJECTS[-1]}_SA_ES.nii.gz"
    bad.write_bytes(gzip.compress(b"not a NIfTI header" * 40))
    return dst


def predict(data: Path, run: Path, out: Path, *extra: str) -> tuple[list[dict], dict]:
    args = ["predict", "--data", str(data), "--run", str(run), "--out", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())


def relative(records: list[dict], out: Path) -> list[dict]:
    """Records with the output folder's paths made relative (the two runs write elsewhere)."""
    text = json.dumps(records).replace(str(out) + "/", "")
    return json.loads(text)


@pytest.fixture(scope="module")
def local(data: Path, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("local")
    return out, *predict(data, tiny_run, out, "--figures", "flagged")


def test_ray_records_equal_the_local_engines(cluster, local, data, tiny_run, tmp_path) -> None:
    out_l, rec_l, sum_l = local
    rec_r, sum_r = predict(
        data, tiny_run, tmp_path, "--figures", "flagged", "--engine", "ray", "--batch-size", "3"
    )
    assert len(rec_r) == len(rec_l) == 2 * 2 * len(SUBJECTS) - 1
    assert relative(rec_r, tmp_path) == relative(rec_l, out_l)  # every field, in case order
    assert sum_r["skipped"] == sum_l["skipped"]
    assert len(sum_r["skipped"]) == 1 and "SA_ES" in sum_r["skipped"][0]["path"]
    assert sum_r["engine"] == "ray" and sum_r["views"] == sum_l["views"]
    for r in rec_r:  # the actors wrote the masks and figures, byte for byte the local ones
        mask = Path(r["mask"])
        assert mask.read_bytes() == (out_l / mask.relative_to(tmp_path)).read_bytes()
        if r["ood"]:
            assert Path(r["figure"]).is_file()


def test_a_killed_worker_loses_no_case_and_leaves_no_partial_file(
    cluster, local, data, tiny_run, tmp_path, monkeypatch
) -> None:
    out_l, rec_l, _ = local
    marker = tmp_path / "killed"
    # the first actor to write a mask dies by SIGKILL between writing it and renaming it
    monkeypatch.setenv("QCLOOP_CRASH_AT", "atomic.before_rename")
    monkeypatch.setenv("QCLOOP_CRASH_ONCE", str(marker))
    out = tmp_path / "out"
    rec_r, _ = predict(data, tiny_run, out, "--engine", "ray", "--workers", "2", "--view", "SA")
    assert marker.exists(), "no worker was killed"
    sa_local = relative([r for r in rec_l if r["view"] == "SA"], out_l)  # a copy
    for r in sa_local:
        r.pop("figure", None)  # this run draws none
    assert relative(rec_r, out) == sa_local
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == sorted(Path(r["mask"]).name for r in rec_r)  # no temporary left behind
    for r in rec_r:
        nib.load(r["mask"]).get_fdata()


def assess(data: Path, run: Path, out: Path, *extra: str):
    args = ["assess", "--data", str(data), "--run", str(run), "--out", str(out), *extra]
    return CliRunner().invoke(cli, args)


def test_the_ray_engine_refuses_what_it_cannot_do(data, tiny_run, tmp_path) -> None:
    r = assess(data, tiny_run, tmp_path / "o", "--workers", "2")
    assert r.exit_code == 2 and "--workers apply to --engine ray only" in r.output
    r = assess(data, tiny_run, tmp_path / "o", "--engine", "spark")
    assert r.exit_code == 2 and "'spark' is not one of" in r.output
    qc = tmp_path / "run"
    shutil.copytree(tiny_run, qc)
    cfg = (qc / "config.yaml").read_text()
    (qc / "config.yaml").write_text(
        cfg.replace("population: reference", "population: transductive")
    )
    r = assess(data, qc, tmp_path / "t", "--engine", "ray")
    assert r.exit_code == 1 and "transductive fences" in r.output, r.output
    assert not (tmp_path / "t" / "records.jsonl").exists()


def test_without_ray_the_command_names_the_extra(data, tiny_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.data", None)  # import ray.data -> ImportError
    r = assess(data, tiny_run, tmp_path, "--engine", "ray")
    assert r.exit_code == 1
    assert "pip install 'qcloop[ray]'" in r.output


def test_calibrate_on_ray_fits_the_local_fences(cluster, tiny_run, tiny_cohort, tmp_path) -> None:
    from tests.helpers import torch_card

    card = torch_card(tiny_run, tmp_path / "vendor")
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        args = ["calibrate", "--run", str(tiny_run), "--model", str(card), "--data",
                str(tiny_cohort), "--out", str(outs[engine]), "--view", "SA", "--engine", engine]  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    fences = [(outs[e] / "SA" / "fences.json").read_text() for e in ("local", "ray")]
    assert fences[0] == fences[1]
    views = [json.loads((outs[e] / "run.json").read_text())["views"] for e in ("local", "ray")]
    assert views[0] == views[1] and views[0]["SA"]["reference_cases"] > 0


def test_outputs_go_to_a_filesystem_uri(cluster, local, data, tiny_run, tmp_path) -> None:
    """--out file://... (any pyarrow filesystem: s3://, gs://): masks, figures and records are
    copied there under a temporary name and moved; records name them by URI."""
    out_l, rec_l, _ = local
    sa_local = relative([r for r in rec_l if r["view"] == "SA"], out_l)
    for engine in ("local", "ray"):
        uri = f"file://{tmp_path}/store/{engine}"
        args = ["predict", "--data", str(data), "--run", str(tiny_run), "--out", uri,
                "--view", "SA", "--figures", "flagged", "--engine", engine]  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        folder = tmp_path / "store" / engine
        lines = (folder / "records.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert all(r["mask"].startswith(uri + "/masks/") for r in records)
        assert json.loads(json.dumps(records).replace(uri + "/", "")) == sa_local
        for r in records:
            mask = Path(r["mask"].removeprefix("file://"))
            assert mask.read_bytes() == (out_l / "masks" / mask.name).read_bytes()
        assert json.loads((folder / "summary.json").read_text())["out"] == uri
        leftovers = [p for p in folder.rglob("*") if ".tmp." in p.name]
        assert not leftovers


def test_a_bad_uri_is_refused_before_any_work(data, tiny_run) -> None:
    args = ["predict", "--data", str(data), "--run", str(tiny_run), "--out", "nosuch://x/y"]
    result = CliRunner().invoke(cli, args)
    assert (
        result.exit_code == 1 and "nosuch://x/y: not a filesystem pyarrow can open" in result.output
    )
