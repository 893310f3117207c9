"""A run folder is used only when complete: a training killed between views leaves a folder
that is refused (and resumed by training again), and a refinement that fails leaves nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcloop.monitor.cli.main import cli
from qcloop.monitor.method.refine import refine_run
from qcloop.monitor.method.run_folder import RunError, load_model_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_interrupted_training_is_refused_until_it_completes(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "run.json").unlink()  # what a training killed before its last write leaves
    with pytest.raises(RunError, match=r"incomplete run folder .* resume it"):
        load_model_set(run, "SA")
    args = ["assess", "--run", str(run), "--data", str(tiny_cohort), "--out", str(tmp_path / "a")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "incomplete run folder" in result.output
    load_model_set(run, "SA", fences=False)  # training itself reads it back while it works


def test_a_failed_refinement_leaves_no_run_folder(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qcloop.monitor.method.refine as refine

    real = refine.refine_view

    def fails_on_la(view, *args, **kwargs):
        if view == "LA":
            raise RuntimeError("killed between views")
        return real(view, *args, **kwargs)

    monkeypatch.setattr(refine, "refine_view", fails_on_la)
    out = tmp_path / "refined"
    with pytest.raises(RuntimeError, match="between views"):
        refine_run(tiny_cohort, tiny_run, out, where={"vendor": "C"})
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half run, no staging left
    taken = tmp_path / "taken"
    (taken / "x").parent.mkdir()
    (taken / "x").write_text("someone's")
    with pytest.raises(RunError, match="not empty"):
        refine_run(tiny_cohort, tiny_run, taken)
