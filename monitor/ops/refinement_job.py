"""One refinement of a served view on its drifted window: the window written as a dataset
folder, the refiner run on it, the refined run registered and gated, and the result recorded.

Per job, in order:

1. the window's inputs become ``OUT/windows/<id>/`` (hard links in the M&Ms-2 layout, with
   ``dataset_information.csv`` and the ``alert.json`` that triggered it);
2. the configured refiner runs on it (the champion run's configuration, its ``refinement``
   section replaced when the monitor was given one), writing ``OUT/runs/<id>-refined/``, and
   ``ModelRefined`` is broadcast;
3. with a model registry, the refined run is registered as a challenger with its lineage tags
   and the promotion gate decides (:func:`qcloop.monitor.ops.promotion.register_and_gate`); a
   promotion switches the view to the new champion before the ledger records the refinement.

A failure anywhere is recorded as ``refinement_failed`` and the champion keeps serving.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcloop.monitor.core import atomic
from qcloop.monitor.core.config import QcloopConfig, RefinementConfig
from qcloop.monitor.core.events import ModelRefined
from qcloop.monitor.core.interfaces import ModelRef, ModelRegistry
from qcloop.monitor.ops.alerts import SOURCE_QCLOOP
from qcloop.monitor.ops.files import link_or_copy
from qcloop.monitor.ops.ledger import Ledger, WindowCase, utc_now
from qcloop.monitor.ops.promotion import register_and_gate

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import QcloopPluginManager

log = logging.getLogger(__name__)

__all__ = ["GateFn", "RefineFn", "RefinementJob", "write_window"]

#: ``refine_fn(window_dir, run_dir, out_run, view, cfg)``: runs the refiner, returns its summary.
RefineFn = Callable[[Path, Path, Path, str, QcloopConfig], dict[str, Any]]
#: ``gate_fn(registry, refined_run, champions, cfg, *, window_dir, tags)``: registers and gates
#: (the signature of :func:`qcloop.monitor.ops.promotion.register_and_gate`).
GateFn = Callable[..., dict[str, dict[str, Any]]]


def refine_window(
    window_dir: Path,
    run_dir: Path,
    out_run: Path,
    view: str,
    cfg: QcloopConfig,
    extra_labelled: Sequence[Path] = (),
) -> dict[str, Any]:
    """The default :data:`RefineFn`: ``qcloop refine`` of one view on the window folder,
    anchored on the run's labelled data and the ``extra_labelled`` folders (the monitor's
    corrected cases, ``OUT/labelled``)."""
    from qcloop.monitor.method.refine import refine_run

    return refine_run(
        window_dir, run_dir, out_run, cfg, views=[view], extra_labelled=extra_labelled
    )


def window_key(view: str, champion: ModelRef, cases: list[WindowCase]) -> str:
    """The identity of a refinement: the view, the model refined and the window's first and
    last case. A repeated alert, or a restart, finds the same key, and so the refinement (and
    the version registered from it) already made."""
    seqs = [c.seq for c in cases]
    model = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(champion.version))
    return f"{view}-v{model}-{min(seqs):06d}-{max(seqs):06d}"


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (anything else as its ``str``)."""
    return json.loads(json.dumps(obj, default=str))


def write_window(
    window_dir: Path, out: Path, cases: list[WindowCase], alert: dict[str, Any]
) -> None:
    """The window's inputs (under ``out``) as an M&Ms-2 dataset folder of hard links, with its
    ``dataset_information.csv`` and ``alert.json``."""
    rows = []
    for c in cases:
        src = out / c.processed
        link_or_copy(src, window_dir / src.parent.name / src.name)
        rows.append(
            {
                "SUBJECT_CODE": str(c.seq),
                "DISEASE": "",
                "VENDOR": c.vendor,
                "SCANNER": "",
                "FIELD": "",
                "SPLIT": "window",
                "CASE_ID": c.case_id,
                "PHASE_SCORED": c.phase,
                "OOD": "1" if c.ood else "0",
            }
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(window_dir / "dataset_information.csv", buf.getvalue())
    atomic.write_json(window_dir / "alert.json", jsonable(alert))


class RefinementJob:
    """Runs the monitor's refinements (one at a time, from its loop).

    Args:
        out: the monitor's output folder.
        ledger: where results are recorded.
        cfg: the monitor's configuration (its ``registry`` section drives the gate).
        registry: where refined runs are registered; ``None``: written, not registered.
        refinement: replaces the champion run's ``refinement`` section when given.
        refine_fn: runs the refiner (default: :func:`refine_window`).
        gate_fn: registers and gates (default: the core's promotion gate,
            :func:`~qcloop.monitor.ops.promotion.register_and_gate`).
        pm: the plugin manager events go through.
        service: the monitor's service id (copied into the events).
    """

    def __init__(
        self,
        out: Path,
        ledger: Ledger,
        cfg: QcloopConfig,
        *,
        registry: ModelRegistry | None,
        refinement: RefinementConfig | None,
        refine_fn: RefineFn | None,
        gate_fn: GateFn | None,
        pm: QcloopPluginManager,
        service: str | None = None,
    ) -> None:
        self.out = out
        self.ledger = ledger
        self.cfg = cfg
        self.registry = registry
        self.refinement = refinement
        self.service = service
        # the default anchors on the run's labelled data and the cases corrected since
        # (late ground truth, ops/feedback.py)
        self._refine_fn = refine_fn or partial(refine_window, extra_labelled=[out / "labelled"])
        self._gate_fn = gate_fn or register_and_gate
        self._pm = pm

    def run(
        self,
        view: str,
        alert: dict[str, Any],
        cases: list[WindowCase],
        champion: ModelRef,
        on_promoted: Callable[[str], None],
    ) -> dict[str, Any] | None:
        """Refine ``champion`` on the window ``cases`` that ``alert`` flagged; ``on_promoted``
        switches the view when the gate promoted the result. Returns the ledger event
        (``None`` when the window was empty and nothing ran)."""
        if not cases:
            self.ledger.append(
                {
                    "event": "refinement_skipped",
                    "view": view,
                    "reason": "empty window",
                    "time": utc_now(),
                }
            )
            log.warning("%s: refinement skipped: the window is empty", view)
            return None
        window_id = window_key(view, champion, cases)
        done = self.ledger.refined_windows.get(window_id)
        if done is not None:  # a repeated alert, or one queued again by a restart
            event = {
                "event": "refinement_skipped",
                "view": view,
                "window_id": window_id,
                "reason": f"window already refined ({done.get('refined_run')}, {done.get('time')})",
                "time": utc_now(),
            }
            self.ledger.append(event)
            log.warning("%s: window %s was refined before; not again", view, window_id)
            return event
        try:
            event = self._refine(view, window_id, alert, cases, champion)
            if self.registry is not None:
                self._register(event, alert, champion)
                if event["promoted"]:
                    on_promoted(view)
        except Exception as exc:  # the monitor goes on serving the current champion
            log.exception("%s: refinement on window %s failed", view, window_id)
            event = {
                "event": "refinement_failed",
                "view": view,
                "window_id": window_id,
                "error": repr(exc),
                "time": utc_now(),
            }
        self.ledger.append(event)
        return event

    def _refine(
        self,
        view: str,
        window_id: str,
        alert: dict[str, Any],
        cases: list[WindowCase],
        champion: ModelRef,
    ) -> dict[str, Any]:
        """Write the window, run the refiner, broadcast ``ModelRefined``; the ledger event."""
        window_dir = self.out / "windows" / window_id
        out_run = self.out / "runs" / f"{window_id}-refined"
        n_ood = sum(c.ood for c in cases)
        write_window(window_dir, self.out, cases, alert)
        cfg = self._config(Path(champion.run_dir))
        log.info(
            "%s: refining %s v%s on window %s (%d cases, %d OoD)",
            view,
            champion.name,
            champion.version,
            window_id,
            len(cases),
            n_ood,
        )
        t0 = time.perf_counter()
        if (out_run / "run.json").is_file():  # refined before a crash; staged, so complete
            log.warning("%s: %s was refined before a restart; reusing it", view, out_run)
            info = json.loads((out_run / "run.json").read_text())
        else:
            info = self._refine_fn(window_dir, Path(champion.run_dir), out_run, view, cfg)
        summary = dict((info.get("views") or {}).get(view) or {})
        summary.pop("history", None)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        self._pm.emit(ModelRefined(view, str(out_run), summary, service=self.service))
        return {
            "event": "refinement",
            "view": view,
            "window_id": window_id,
            "window_dir": str(window_dir),
            "refined_run": str(out_run),
            "source": alert.get("source", SOURCE_QCLOOP),
            "window_cases": len(cases),
            "window_ood": n_ood,
            "parent": champion.info(),
            "refine_summary": summary,
            "registered": None,
            "promoted": False,
            "time": utc_now(),
        }

    def _register(self, event: dict[str, Any], alert: dict[str, Any], champion: ModelRef) -> None:
        """Register the refined run with its lineage tags and gate it; fills ``event``'s
        ``registered`` and ``promoted``."""
        tags = {
            "qcloop.window_id": event["window_id"],
            "qcloop.window_cases": str(event["window_cases"]),
            "qcloop.window_ood": str(event["window_ood"]),
            "qcloop.alert_source": str(alert.get("source", SOURCE_QCLOOP)),
            "qcloop.alert_reasons": "; ".join(alert.get("reasons", []))[:500],
        }
        result = self._gate_fn(
            self.registry,
            Path(event["refined_run"]),
            {champion.view: champion},
            self.cfg,
            window_dir=Path(event["window_dir"]),
            tags=tags,
        )[champion.view]
        event["registered"] = jsonable(result)
        event["promoted"] = bool(result.get("promoted"))

    def _config(self, run_dir: Path) -> QcloopConfig:
        """The champion run's configuration, with the monitor's refinement section."""
        from qcloop.monitor.method.run_folder import load_run_config

        cfg = load_run_config(run_dir)
        if self.refinement is not None:
            cfg = cfg.model_copy(update={"refinement": self.refinement})
        return cfg
