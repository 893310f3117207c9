"""The monitor service behind ``qcloop monitor``: an inbox of incoming cases scored by the
champion models, a ledger that makes it restartable, a rolling window and a drift policy per
view, and refinement of the champion when drift is alerted (by the monitor itself or by
Alertmanager).

It composes :mod:`~qcloop.monitor.ops.inbox` (what is ready and what it is),
:mod:`~qcloop.monitor.ops.intake` (one file scored and filed, or rejected),
:mod:`~qcloop.monitor.ops.ledger` (records, ledger, crash recovery),
:mod:`~qcloop.monitor.ops.windows` (the one window per view), :mod:`~qcloop.monitor.ops.alerts`
(the drift policy, cooldown, coalescing, Alertmanager intake) and
:mod:`~qcloop.monitor.ops.refinement_job` (window folder, refine, register and gate). It tells
plugins what happens only through events: ``on_service_started`` / ``on_service_stopped``
around its life (an exporter adds ``/metrics`` to the monitor's HTTP app there), then
``CaseScored``, ``CaseFailed``, ``WindowChanged``, ``DriftAlert``, ``ModelRefined`` and
``ModelsLoaded``, with the monitor's service id. Output layout: docs/monitoring.md.

Order of work per case (:mod:`~qcloop.monitor.ops.intake`): score, write the mask, append the
record, append the ledger entry, move the input to ``processed/``, broadcast ``CaseScored``;
then the case enters its view's window and the drift policy judges it. A restart re-reads the
ledger (and adds entries for records whose ledger line a crash prevented), so no finished case
is scored again and no input is lost: an input still in the inbox whose hash is in the ledger
is moved where the ledger says (or, if that is taken, to ``duplicates/``).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcloop.monitor.core.config import QcloopConfig, RefinementConfig
from qcloop.monitor.core.events import (
    ModelsLoaded,
    ServiceInfo,
    WindowStats,
)
from qcloop.monitor.core.http_endpoint import HttpEndpoint
from qcloop.monitor.core.interfaces import ModelRef, ModelRegistry
from qcloop.monitor.core.plugin_manager import apply_plugin_settings
from qcloop.monitor.data.nifti_header import HeaderLimits
from qcloop.monitor.ops.alerts import AlertPolicy
from qcloop.monitor.ops.drift import DriftLimits
from qcloop.monitor.ops.feedback import take_corrections
from qcloop.monitor.ops.http_app import monitor_app, open_endpoint, paths_served
from qcloop.monitor.ops.inbox import InboxWatcher, sidecar_of
from qcloop.monitor.ops.intake import Intake, shown_name
from qcloop.monitor.ops.ledger import Ledger, WindowCase, utc_now
from qcloop.monitor.ops.out_lock import OutLock
from qcloop.monitor.ops.reference import cached_reference, flag_reference
from qcloop.monitor.ops.refinement_job import GateFn, RefineFn, RefinementJob
from qcloop.monitor.ops.served_view import ServedView, require_estimate
from qcloop.monitor.ops.webhook import AlertDispatcher
from qcloop.monitor.ops.windows import ViewWindows

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.plugin_manager import QcloopPluginManager
    from qcloop.monitor.ops.scoring import OnlineScorer

log = logging.getLogger(__name__)

__all__ = ["Monitor", "ServedView"]  # ServedView: re-exported


class Monitor:
    """Scores an inbox of cases with champion models and refines them on drift.

    Args:
        inbox: folder of incoming cases.
        out: output folder (see the module docstring).
        cfg: configuration (``monitoring`` and ``registry`` sections are used here).
        champions: the model of each served view, with a local run folder.
        registry: where challengers are registered and champions followed; ``None``: refined
            runs are written but not registered.
        follow: the registry spec followed for champions (default
            ``<registry.name_prefix>@champion``).
        runtime: a registered runtime name (``torch``, ``onnxruntime``, ...).
        refinement: overrides the run's ``refinement`` section when refining.
        settle_s: seconds an inbox file must stay unchanged before it is taken.
        cooldown_s: after an alert for a view, seconds before the next one (and at least
            ``monitoring.min_cases`` new cases).
        reload_poll_s: how often the registry alias is checked for a new champion (0: never).
        refine_fn: runs the refinement (default ``qcloop refine`` of the view).
        gate_fn: registers and gates a refined run (default the core's promotion gate).
        pm: the plugin manager events go through (default the process-wide one); the
            configuration's ``plugins.block`` list is applied to it.
        clock: wall clock in seconds (injectable for tests).
        disk_pause_s: how long intake pauses when the disk is full (files stay in the inbox).
        webhook_secret: serve the Alertmanager webhook with this bearer secret (``None``: off).
        figures: which scored cases get a QC figure in ``OUT/figures/`` (``flagged``, ``all``,
            ``none``; none without matplotlib).

    The HTTP app (:mod:`~qcloop.monitor.ops.http_app`: ``/healthz``, the webhook, an exporter's
    ``/metrics``) listens on ``monitoring.http_host:http_port`` from construction to
    :meth:`close` (port 0: no endpoint); ``service.endpoints["http"]`` is its URL.
    """

    _http: HttpEndpoint | None = None  # the HTTP endpoint while it serves

    def __init__(
        self,
        inbox: str | Path,
        out: str | Path,
        cfg: QcloopConfig,
        champions: dict[str, ModelRef],
        *,
        registry: ModelRegistry | None = None,
        follow: str | None = None,
        runtime: str = "torch",
        refinement: RefinementConfig | None = None,
        settle_s: float = 1.0,
        cooldown_s: float = 600.0,
        reload_poll_s: float = 30.0,
        refine_fn: RefineFn | None = None,
        gate_fn: GateFn | None = None,
        pm: QcloopPluginManager | None = None,
        clock: Callable[[], float] = time.time,
        disk_pause_s: float = 30.0,
        webhook_secret: str | None = None,
        figures: str = "flagged",
    ) -> None:
        if not champions:
            raise ValueError("the monitor needs at least one champion model")
        pm = apply_plugin_settings(cfg, pm)  # the plugins.block list of the configuration
        self.inbox = Path(inbox)
        self.out = Path(out).resolve()
        self.cfg, self.registry, self.runtime, self.pm = cfg, registry, runtime, pm
        self.follow = follow or f"{cfg.registry.name_prefix}@champion"
        self.reload_poll_s, self._clock = float(reload_poll_s), clock
        self._lock = threading.RLock()
        self._stop, self._last_reload = threading.Event(), clock()
        self._scorers: dict[tuple[str, str, str], OnlineScorer] = {}
        self.disk_pause_s, self._paused_until = float(disk_pause_s), float("-inf")
        self._stuck: set[Path] = set()  # files that could not even be moved aside: skipped
        self.views: dict[str, ServedView] = {}
        for folder in (self.inbox, self.out):
            folder.mkdir(parents=True, exist_ok=True)
        self._out_lock: OutLock | None = OutLock(self.out)  # OutFolderBusy: another monitor
        self.watcher = InboxWatcher(self.inbox, settle_s)
        self.corrections = InboxWatcher(self.out / "corrected", settle_s)  # late ground truth
        self._webhook = webhook_secret is not None
        hook = (
            None if webhook_secret is None else AlertDispatcher(self.receive_alert, webhook_secret)
        )
        app = monitor_app(self.health, hook)
        self.service = ServiceInfo(kind="monitor", config=cfg, app=app, out=self.out)
        self._started = True
        pm.service_started(self.service)
        try:
            self.ledger = Ledger(self.out)
            self.intake = Intake(self.out, self.ledger, pm, self.service.id, self._limits, figures)
            self.windows = ViewWindows(cfg.monitoring.window, pm=pm, service=self.service.id)
            self.alerts = AlertPolicy(
                DriftLimits.from_config(cfg.monitoring),
                self.ledger,
                cooldown_s=cooldown_s,
                refine_on_alert=cfg.monitoring.refine_on_alert,
                pm=pm,
                service=self.service.id,
                clock=clock,
            )
            self.job = RefinementJob(
                self.out,
                self.ledger,
                cfg,
                registry=registry,
                refinement=refinement,
                refine_fn=refine_fn,
                gate_fn=gate_fn,
                pm=pm,
                service=self.service.id,
            )
            for view, champion in champions.items():
                self._open_view(view, champion)
            self._announce_models(reload=False)
            self._open_http()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ models

    def _open_view(self, view: str, champion: ModelRef) -> None:
        """Serve ``view`` with ``champion``: its window and alert state as the ledger left them."""
        served = self._served(view, champion)
        history = self.ledger.history(view, str(champion.version))
        cases = history.cases[-self.windows.size :]
        self.windows.restore(
            view,
            [(c.ood, c.pdc) for c in cases],
            items=cases,
            ests=[c.est for c in cases],
            model_version=str(champion.version),
            reference_median=served.reference_median,
        )
        self.alerts.restore(view, history)
        with self._lock:
            self.views[view] = served

    def _served(self, view: str, champion: ModelRef) -> ServedView:
        """A view's scorer and reference median for ``champion``."""
        scorer = self._scorer(view, champion)
        require_estimate(self.cfg.monitoring, scorer, champion)
        entry = cached_reference(self.out, champion, scorer)
        median = None if entry is None else float(entry["median_pdc"])
        flags = flag_reference(entry)
        return ServedView(view, champion, scorer, median, flags, self.windows, self.alerts)

    def _scorer(self, view: str, champion: ModelRef) -> OnlineScorer:
        key = (view, champion.name, str(champion.version))
        if key not in self._scorers:
            from qcloop.monitor.ops.scoring import load_online_scorers

            self._scorers[key] = load_online_scorers(
                champion.run_dir, [view], runtime=self.runtime, model_info=champion.info()
            )[view]
        return self._scorers[key]

    def _announce_models(self, *, reload: bool) -> None:
        """Broadcast ``ModelsLoaded`` with every served view's model and runtime."""
        with self._lock:
            served = dict(self.views)
        views = {
            view: {
                **s.champion.info(),
                "runtime": s.scorer.runtime.name,
                "providers": list(s.scorer.runtime.providers()),
            }
            for view, s in sorted(served.items())
        }
        self.pm.emit(ModelsLoaded(views, reload=reload, service=self.service.id))

    def switch_champion(self, view: str, champion: ModelRef) -> None:
        """Serve ``view`` with ``champion`` from now on: new scorer, reference, empty window."""
        served = self._served(view, champion)
        with self._lock:
            old = self.views[view]
            self.views[view] = served
        self.alerts.new_model(view)
        self.ledger.append(
            {
                "event": "window_reset",
                "view": view,
                "model": champion.info(),
                "previous": old.champion.info(),
                "time": utc_now(),
            }
        )
        self.windows.reset(
            view, model_version=str(champion.version), reference_median=served.reference_median
        )
        self._announce_models(reload=True)
        log.info(
            "%s: now serving %s v%s (was v%s)",
            view,
            champion.name,
            champion.version,
            old.champion.version,
        )

    def check_champions(self, force: bool = False) -> None:
        """Follow the registry alias: switch views whose champion moved (e.g. after
        ``qcloop models promote``); checked every ``reload_poll_s`` seconds."""
        if self.registry is None or (not force and self.reload_poll_s <= 0):
            return
        now = self._clock()
        if not force and now - self._last_reload < self.reload_poll_s:
            return
        self._last_reload = now
        try:
            versions = self.registry.alias_versions(self.follow)
        except Exception:
            log.exception("cannot read the registry's current versions; keeping the models")
            return
        moved = [
            v for v, version in versions.items() if v in self.views and version != self._version(v)
        ]
        if not moved:
            return
        try:
            refs = self.registry.resolve(self.follow)
            for view in moved:
                self.switch_champion(view, refs[view])
        except Exception as exc:
            log.exception("%s: cannot load the new versions; keeping the current ones", moved)
            self.pm.emit(
                ModelsLoaded(
                    {}, outcome="failed", reload=True, error=repr(exc), service=self.service.id
                )
            )

    def _limits(self, view: str) -> HeaderLimits:
        """What an inbox file of ``view`` may be (``qcloop serve``'s limits, the model's
        spacing), judged from its header before it is loaded."""
        with self._lock:
            scorer = self.views[view].scorer
        preprocessor = getattr(scorer, "preprocessor", None)
        return HeaderLimits(
            max_inplane=self.cfg.serving.max_inplane,
            max_slices=self.cfg.serving.max_slices,
            target_spacing_mm=getattr(preprocessor, "target_spacing", None),
        )

    def _version(self, view: str) -> str:
        with self._lock:
            return str(self.views[view].champion.version)

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        """Ask :meth:`run` to return after the case in progress."""
        self._stop.set()

    def run(self, poll_s: float = 2.0, *, once: bool = False) -> None:
        """Watch the inbox until :meth:`stop` (``once``: take what is ready, then return)."""
        if once:
            self.step()
            if self._stop.wait(self.watcher.settle_s):
                return
            self.step()
            self.run_pending()
            return
        while not self._stop.is_set():
            busy = self.step()
            self.run_pending()
            self.check_champions()
            if not busy:
                self._stop.wait(poll_s)

    def step(self) -> int:
        """Process every ready inbox file (refining between cases when an alert is pending);
        returns how many were taken. Nothing is taken while intake is paused (a full disk)."""
        if self._clock() < self._paused_until:
            return 0
        cases, others = self.watcher.scan()
        others = [(p, why) for p, why in others if p not in self._stuck]
        for path, reason in others:
            self.watcher.forget(path)
            self._barrier(path, lambda p=path, r=reason: self.intake.reject(p, None, "read", r))
        taken = 0
        for path in [p for p in cases if p not in self._stuck]:
            if self._stop.is_set() or self._clock() < self._paused_until:
                break
            self.watcher.forget(path)
            self.process_file(path)
            taken += 1
            self.run_pending()
        # late ground truth: corrected masks in OUT/corrected/ (ops/feedback.py)
        return (
            taken
            + len(others)
            + take_corrections(self.corrections, self.out, self.ledger, self.pm, self.service.id)
        )

    def _open_http(self) -> None:
        """Serve the HTTP app where ``monitoring.http_port`` says (0: nowhere)."""
        self._http = open_endpoint(self.service.app, self.cfg.monitoring, "qcloop-monitor-http")
        if self._http is not None:
            for path in paths_served(self.service.app, webhook=self._webhook):
                self.service.endpoints[path.strip("/")] = self._http.url + path

    def health(self) -> dict[str, Any]:
        """What ``GET /healthz`` answers: intake running or paused, views served, files
        skipped because they could not even be moved aside."""
        with self._lock:
            views = sorted(self.views)
            skipped = len(self._stuck)
        paused = self._clock() < self._paused_until
        return {
            "status": "ok",
            "intake": "paused: disk full" if paused else "running",
            "views": views,
            "skipped_files": skipped,
        }

    def close(self) -> None:
        """Stop the service: its HTTP endpoint closes, plugins release what they opened."""
        if self._http is not None:
            self._http.close()
            self._http = None
            self.service.endpoints.clear()
        if self._started:
            self._started = False
            self.pm.service_stopped(self.service)
        if self._out_lock is not None:
            self._out_lock.release()
            self._out_lock = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ cases

    def process_file(self, path: Path) -> str:
        """Score one inbox file; returns ``"scored"``, ``"rejected"``, ``"recovered"``,
        ``"duplicate"``, ``"vanished"``, ``"paused"`` (the disk is full: the file stays in the
        inbox) or ``"stuck"`` (it cannot even be moved aside: skipped from now on)."""
        with self._lock:
            scorers = {view: served.scorer for view, served in self.views.items()}

        def take() -> str:
            taken = self.intake.take(path, scorers)
            if taken.entry is not None:
                self._after_case(taken.entry)
            return taken.outcome

        return self._barrier(path, take)

    def _barrier(self, path: Path, work: Callable[[], str]) -> str:
        """Run the ``work`` on one inbox file so that nothing it raises stops the monitor: a
        full disk pauses intake (the file stays); any other failure rejects the file with its
        reason; a file that cannot even be moved aside is remembered and skipped."""
        try:
            return work()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return self._reject_after_failure(path, exc)
            self._paused_until = self._clock() + self.disk_pause_s
            log.error(
                "%s: disk full (%s); intake paused for %.0f s, the file stays in the inbox",
                shown_name(path), exc, self.disk_pause_s,
            )  # fmt: skip
            return "paused"
        except Exception as exc:
            return self._reject_after_failure(path, exc)

    def _reject_after_failure(self, path: Path, exc: BaseException) -> str:
        """Reject a file whose processing raised ``exc`` (stage ``internal``); remember it when
        even that fails."""
        log.exception("%s: processing failed", shown_name(path))
        reason = f"processing failed: {type(exc).__name__}: {exc}"
        try:
            return self.intake.reject(path, sidecar_of(path), "internal", reason)
        except Exception:
            log.exception("%s: cannot be moved aside either; skipped from now on", shown_name(path))
            self._stuck.add(path)
            return "stuck"

    def _after_case(self, entry: dict[str, Any]) -> None:
        """A scored case enters its view's window; the drift policy judges the window."""
        view = str(entry["view"])
        case = WindowCase.from_entry(entry)
        stats = self.windows.add(view, case.ood, case.pdc, case, case.est)
        with self._lock:
            served = self.views[view]
        self.alerts.after_case(
            view, stats, served.reference_median, served.champion.info(), flags=served.flags
        )

    # ------------------------------------------------------------------ drift

    def window_stats(self, view: str) -> WindowStats:
        """Statistics of the view's current rolling window."""
        return self.windows.stats(view)

    def receive_alert(self, view: str, am_alert: dict[str, Any]) -> str:
        """Handle a firing alert from Alertmanager for ``view`` (webhook thread); returns the
        outcome: ``queued``, ``coalesced`` (a refinement is pending), ``cooldown`` or
        ``unknown view``."""
        with self._lock:
            served = self.views.get(view)
            if served is None:
                return f"unknown view {view!r} (serving {', '.join(sorted(self.views))})"
        return self.alerts.receive(
            view,
            am_alert,
            self.windows.stats(view),
            served.reference_median,
            served.champion.info(),
        )

    def run_pending(self) -> None:
        """Run the refinements queued by alerts (inbox cases wait meanwhile)."""
        for view in list(self.views):
            alert = self.alerts.pending(view)
            if alert is None:
                continue
            try:
                self.refine(view, alert)
            finally:
                self.alerts.done(view)

    def refine(self, view: str, alert: dict[str, Any]) -> dict[str, Any] | None:
        """Refine the champion of ``view`` on its current window, register the result as a
        challenger and follow a promotion; returns the ledger event (``None`` if skipped)."""
        with self._lock:
            champion = self.views[view].champion
        cases = self.windows.items(view)
        return self.job.run(view, alert, cases, champion, self._follow_promotion)

    def _follow_promotion(self, view: str) -> None:
        """The gate promoted a refined model of ``view``: serve the followed alias's version."""
        assert self.registry is not None
        self.switch_champion(view, self.registry.resolve(self.follow)[view])
