"""The work of one ``qcloop serve`` app: check, read, score and encode each upload, and report
what happened as events (case scored or failed, window changed, models loaded, queue changed).

The app talks to metric exporters only through these events, each stamped with the service's
id (:attr:`~qcloop.monitor.core.events.ServiceInfo.id`); the rolling window of every view is the
core's :class:`~qcloop.monitor.ops.windows.ViewWindows`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile

from qcloop.deploy.serve.admission import WorkLimiter
from qcloop.deploy.serve.mask_store import MaskStore
from qcloop.deploy.serve.model_source import ModelBundle
from qcloop.deploy.serve.upload import UploadLimits, UploadProblem, inspect_upload, store_upload
from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.events import CaseFailed, CaseScored, Event, ModelsLoaded
from qcloop.monitor.ops.drift import decision_est, decision_pdc
from qcloop.monitor.ops.windows import ViewWindows

log = logging.getLogger(__name__)

__all__ = ["EventSink", "ServeService"]


class EventSink:
    """The events of one service: stamped with its id and broadcast through a plugin manager
    (which isolates failing subscribers: an exporter never fails a request)."""

    def __init__(self, pm: Any, service_id: str) -> None:
        self.pm = pm
        self.service_id = service_id

    def emit(self, event: Event) -> None:
        """Broadcast ``event`` as emitted by this service."""
        self.pm.emit(dataclasses.replace(event, service=self.service_id))


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def loaded_views(bundle: ModelBundle) -> dict[str, dict[str, Any]]:
    """Per view the name, version, runtime and providers of a bundle's models."""
    return {
        view: {
            "name": str(info["model"].get("name", "")),
            "version": str(info["model"].get("version", "unregistered")),
            "runtime": info["runtime"],
            "providers": list(info["providers"]),
        }
        for view, info in bundle.describe()["views"].items()
    }


class ServeService:
    """Per-app state: the models, admission control, mask store, private temporary folder,
    the views' rolling windows and the service's events."""

    def __init__(self, manager: Any, cfg: QcloopConfig, events: EventSink) -> None:
        self.manager = manager
        self.cfg = cfg
        self.events = events
        self.windows = ViewWindows(cfg.monitoring.window, pm=events.pm, service=events.service_id)
        self.limiter = WorkLimiter(
            cfg.serving.max_concurrency, cfg.serving.queue_size, on_change=events.emit
        )
        self.masks = MaskStore()
        self._workdir: Path | None = None
        self._workdir_lock = threading.Lock()

    # ------------------------------------------------------------------ models

    def models_swapped(self, old: ModelBundle | None, new: ModelBundle) -> None:
        """New models are in use: report them, and start every view's window again."""
        views = loaded_views(new)
        self.events.emit(ModelsLoaded(views, outcome="ok", reload=old is not None))
        for view, info in views.items():
            reference = new.reference_medians.get(view)
            self.windows.reset(view, model_version=info["version"], reference_median=reference)

    def models_failed(self, error: str) -> None:
        """A load or reload failed (the models in use, if any, stay)."""
        reload = self.manager.bundle is not None
        self.events.emit(ModelsLoaded({}, outcome="failed", reload=reload, error=error))

    # ------------------------------------------------------------------ requests

    @property
    def workdir(self) -> Path:
        """This server's private temporary folder (mode 0700), made on first use."""
        with self._workdir_lock:
            if self._workdir is None or not self._workdir.is_dir():
                self._workdir = Path(tempfile.mkdtemp(prefix="qcloop-serve-"))
            return self._workdir

    def limits(self, scorer: Any) -> UploadLimits:
        """What an upload for ``scorer`` may be (the ``serving`` section, the model's spacing)."""
        preprocessor = getattr(scorer, "preprocessor", None)
        return UploadLimits(
            max_inplane=self.cfg.serving.max_inplane,
            max_slices=self.cfg.serving.max_slices,
            target_spacing_mm=getattr(preprocessor, "target_spacing", None),
        )

    def _failed(self, stage: str, reason: str, view: str) -> None:
        self.events.emit(CaseFailed(stage, reason, source="upload", view=view))

    def _segment(
        self, upload: UploadFile, scorer: Any, view: str, phase: str, request_id: str
    ) -> tuple[Any, Any, bytes]:
        """Check, store, read and score one upload; the header summary, the scoring result
        and the mask file's bytes. Each refusal is reported with its stage."""
        from qcloop.monitor.data import CaseError, CaseSource, load_case, save_label_map

        try:
            summary = inspect_upload(upload.file, self.limits(scorer))
        except UploadProblem as exc:
            self._failed("validate", exc.reason, view)
            raise
        folder = Path(tempfile.mkdtemp(prefix="req-", dir=self.workdir))
        try:
            path = store_upload(upload.file, folder, summary)
            upload.file.close()  # the spooled copy is no longer needed
            source = CaseSource(
                subject=request_id, view=view, phase=phase, image_path=path, gt_path=None
            )
            try:
                case = load_case(source)
            except CaseError as exc:
                self._failed("read", exc.reason, view)
                raise UploadProblem(422, exc.reason) from exc
            except Exception as exc:  # nibabel/numpy on a hostile file: a bad upload, not a crash
                reason = f"unreadable NIfTI file ({type(exc).__name__}: {exc})"
                self._failed("read", reason, view)
                raise UploadProblem(422, reason) from exc
            try:
                result = scorer.score(case)
            except CaseError as exc:
                self._failed("score", exc.reason, view)
                raise UploadProblem(422, exc.reason) from exc
            mask_path = save_label_map(folder / "mask.nii.gz", result.labels, case)
            return summary, result, mask_path.read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _window_pdc(view: str, record: dict[str, Any]) -> float | None:
        """The record's decision pDC for the drift window (``None``, logged, when unusable)."""
        try:
            return decision_pdc(record)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: case %s left out of the drift window: %s", view, record["image"], exc)
            return None

    def process(
        self,
        bundle: ModelBundle,
        upload: UploadFile,
        view: str,
        phase: str,
        request_id: str,
        client_name: str | None,
        figure: bool = False,
    ) -> tuple[dict[str, Any], bytes, bytes | None]:
        """Check, load, score and encode one upload (runs in a worker thread); the case's QC
        record, its mask (gzipped NIfTI) and, with ``figure``, its QC figure (PNG)."""
        start = time.perf_counter()
        scorer = bundle.scorers[view]
        summary, result, payload = self._segment(upload, scorer, view, phase, request_id)
        png = scorer.figure_png(result) if figure else None
        record = dict(result.record)
        record["image"] = client_name
        record["request"] = {
            "id": request_id,
            "upload": {"shape": list(summary.shape), "dtype": summary.dtype},
            "latency_s": time.perf_counter() - start,
            "timings_s": dict(result.timings_s),
        }
        pdc = self._window_pdc(view, record)
        record = _finite(record)
        self.events.emit(CaseScored(record))
        if pdc is not None:
            self.windows.add(view, bool(record.get("ood")), pdc, est=decision_est(record))
        return record, payload, png

    def close(self) -> None:
        """Finish running jobs, then remove the temporary folder."""
        self.limiter.shutdown()
        with self._workdir_lock:
            workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
