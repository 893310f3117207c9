"""The monitor service behind ``qcloop monitor``: an inbox of incoming cases scored by the
champion models, a ledger that makes it restartable, a drift policy per view, and refinement
of the champion when drift is alerted (by the monitor itself or by Alertmanager).

Output folder::

    OUT/records.jsonl             one QC record per scored case (fsync'd appends)
    OUT/ledger.jsonl              processed cases by content hash, window resets, alerts,
                                  refinements (fsync'd appends)
    OUT/masks/<id>_pred.nii.gz    the QC-selected mask on the case's grid (atomic writes)
    OUT/processed/<VIEW>/NNNNNN/NNNNNN_<VIEW>_<PHASE>.nii.gz
                                  scored inputs, in the M&Ms-2 layout (+ their sidecar JSON)
    OUT/rejected/<name>           inputs that could not be scored, with <name>.reason.txt
    OUT/duplicates/<name>         inputs whose content was already scored
    OUT/windows/<id>/             the drift window a refinement ran on (hard links, M&Ms-2
                                  layout with dataset_information.csv) and its alert.json
    OUT/runs/<id>-refined/        the refined run folder (registered as challenger)
    OUT/reference.json            reference median decision pDC per view and model run

A case is taken from the inbox once its size and modification time have not changed for
``settle_s`` seconds (or when it was renamed in: writers should write ``.name.part`` or any
hidden name, then rename). Hidden files and ``*.json`` sidecars are not cases.

Order of work per case: score, write the mask, append the record, append the ledger entry, move
the input to ``processed/``, broadcast ``on_case_scored``. A restart re-reads the ledger (and
adds entries for records whose ledger line a crash prevented), so no finished case is scored
again and no input is lost: an input still in the inbox whose hash is in the ledger is moved
where the ledger says (or, if that is taken, to ``duplicates/``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qcloop.monitor.core import atomic
from qcloop.monitor.core.atomic import sha256_file
from qcloop.monitor.core.config import QcloopConfig, RefinementConfig
from qcloop.monitor.data import CaseError, CaseSource
from qcloop.monitor.ops.drift import (
    DriftLimits,
    RollingWindow,
    WindowStats,
    decision_pdc,
    judge_drift,
)
from qcloop.monitor.ops.files import (
    JsonlLog,
    free_name,
    link_or_copy,
    move_file,
    nifti_suffix,
    stem_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.ops.scoring import OnlineScorer
    from qcloop.plugins.prometheus.exporter import QcMetrics

log = logging.getLogger(__name__)

VIEWS = ("SA", "LA")
_VIEW_RX = re.compile(r"(?:^|[_.-])(SA|LA)(?=[_.-]|$)", re.IGNORECASE)
_PHASE_RX = re.compile(r"(?:^|[_.-])(ED|ES)(?=[_.-]|$)", re.IGNORECASE)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SIDECAR_KEYS = {"view", "phase", "vendor", "disease", "subject"}
_SOURCE_ALERTMANAGER = "alertmanager"
_SOURCE_QCLOOP = "qcloop"


def _utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- models


@dataclass
class Champion:
    """The model set serving one view: a registered version and its local run folder."""

    view: str
    run_dir: Path
    version: str
    name: str
    #: the registry's ``ModelRef`` (passed back to ``register_and_gate``); ``None`` without one.
    ref: Any = None

    @classmethod
    def from_ref(cls, ref: Any) -> Champion:
        """From a :class:`qcloop.monitor.ops.registry.ModelRef`."""
        return cls(str(ref.view), Path(ref.run_dir), str(ref.version), str(ref.name), ref)

    def info(self) -> dict[str, str]:
        """Identity copied into every record under ``"model"``."""
        return {"name": self.name, "version": self.version}


class ModelRegistry(Protocol):
    """Where champions come from and challengers go (MLflow in :class:`MlflowModelRegistry`)."""

    def register_and_gate(
        self,
        refined_run: Path,
        champion: Champion,
        *,
        window_dir: Path,
        tags: dict[str, str],
    ) -> dict[str, Any]:
        """Register ``refined_run`` (one view) as challenger, gate it against ``champion``,
        apply the promotion policy; returns ``{"version", "gate", "promoted"}`` of the view."""
        ...

    def current_versions(self) -> dict[str, str]:
        """View -> version the followed alias points at now (cheap; polled)."""
        ...

    def champion(self, view: str) -> Champion:
        """The current model of ``view`` with a local run folder."""
        ...


class MlflowModelRegistry:
    """:class:`ModelRegistry` on ``qcloop.monitor.ops.registry`` (MLflow model registry).

    Args:
        spec: the followed models, ``PREFIX@ALIAS`` (e.g. ``qcloop@champion``).
        cfg: configuration whose ``registry`` section (promotion, dice_margin) applies.
        tracking_uri: MLflow tracking URI (default: ``sqlite:///<cwd>/mlflow.db``).
        cache_dir: where downloaded versions go.
    """

    def __init__(
        self,
        spec: str,
        cfg: QcloopConfig,
        *,
        tracking_uri: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.cache_dir = cache_dir

    @classmethod
    def for_run(
        cls,
        run_dir: Path,
        cfg: QcloopConfig,
        *,
        tracking_uri: str | None = None,
        cache_dir: Path | None = None,
    ) -> tuple[MlflowModelRegistry, dict[str, Champion]]:
        """Register ``run_dir`` when needed (champion when a model has none) and follow
        ``PREFIX@champion``; returns the registry and the current champions."""
        from qcloop.monitor.ops.registry import ensure_champion

        prefix = cfg.registry.name_prefix
        refs = ensure_champion(Path(run_dir), name_prefix=prefix, tracking_uri=tracking_uri)
        registry = cls(f"{prefix}@champion", cfg, tracking_uri=tracking_uri, cache_dir=cache_dir)
        return registry, {v: Champion.from_ref(r) for v, r in refs.items()}

    def champions(self) -> dict[str, Champion]:
        """Every view the spec selects, resolved to local run folders."""
        from qcloop.monitor.ops.registry import resolve_model

        refs = resolve_model(self.spec, tracking_uri=self.tracking_uri, cache_dir=self.cache_dir)
        return {v: Champion.from_ref(r) for v, r in refs.items()}

    def champion(self, view: str) -> Champion:
        """The current model of ``view``."""
        champions = self.champions()
        if view not in champions:
            raise KeyError(f"{self.spec}: no {view} model")
        return champions[view]

    def current_versions(self) -> dict[str, str]:
        """View -> version of the followed alias."""
        from qcloop.monitor.ops.registry import alias_versions

        return alias_versions(self.spec, tracking_uri=self.tracking_uri)

    def register_and_gate(
        self,
        refined_run: Path,
        champion: Champion,
        *,
        window_dir: Path,
        tags: dict[str, str],
    ) -> dict[str, Any]:
        """Register, gate and (by policy) promote the refined run of one view."""
        from qcloop.monitor.ops.registry import register_and_gate

        ref = champion.ref
        if ref is None:
            raise ValueError(f"{champion.name}: the champion has no registry reference")
        result = register_and_gate(
            refined_run,
            {champion.view: ref},
            self.cfg,
            window_dir=window_dir,
            tags=tags,
            tracking_uri=self.tracking_uri,
        )
        return result[champion.view]


# --------------------------------------------------------------------------- inbox


@dataclass(frozen=True)
class InboxCase:
    """One input file and what is known about it before loading."""

    path: Path
    sidecar: Path | None
    view: str
    phase: str
    metadata: dict[str, str]


def read_identity(path: Path) -> InboxCase:
    """View, phase and metadata of an inbox file from its sidecar JSON (``<stem>.json``) or its
    name (``*_SA*``/``*_LA*``, ``*_ED*``/``*_ES*``); ``CaseError`` when the view is unknown."""
    stem = stem_of(path.name)
    sidecar = path.with_name(f"{stem}.json")
    meta: dict[str, str] = {}
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CaseError(sidecar, f"sidecar is not readable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CaseError(sidecar, "sidecar must be a JSON object")
        for key, value in data.items():
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise CaseError(sidecar, f"field {key!r} must be a string or number")
            meta[str(key)] = str(value).strip()
    else:
        sidecar = None
    view = meta.get("view", "").upper()
    if not view:
        m = _VIEW_RX.search(stem)
        view = m.group(1).upper() if m else ""
    if view not in VIEWS:
        where = f"sidecar field 'view' is {meta['view']!r}" if "view" in meta else "no view"
        raise CaseError(
            path,
            f"cannot tell the view ({where}): name the file *_SA* or *_LA*, or add a sidecar "
            f'{stem}.json with "view": "SA" or "LA"',
        )
    phase = meta.get("phase", "").upper()
    if not phase:
        m = _PHASE_RX.search(stem)
        phase = m.group(1).upper() if m else "unknown"
    metadata = {k: v for k, v in meta.items() if k not in ("view", "phase")}
    return InboxCase(path, sidecar, view, phase, metadata)


class InboxWatcher:
    """Which inbox files are ready: unchanged (size, mtime) for ``settle_s`` seconds.

    Args:
        inbox: the folder watched (not recursive).
        settle_s: how long a file must stay unchanged before it is taken.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self, inbox: Path, settle_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inbox = Path(inbox)
        self.settle_s = float(settle_s)
        self._clock = clock
        self._seen: dict[Path, tuple[int, int, float]] = {}

    def scan(self) -> tuple[list[Path], list[Path]]:
        """(ready NIfTI files oldest first, ready files that are neither NIfTI nor JSON)."""
        now = self._clock()
        present = {}
        try:
            entries = list(self.inbox.iterdir())
        except FileNotFoundError:
            return [], []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower().endswith(".json"):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if not entry.is_file():
                continue
            key = (st.st_size, st.st_mtime_ns)
            prev = self._seen.get(entry)
            since = prev[2] if prev is not None and prev[:2] == key else now
            present[entry] = (key[0], key[1], since)
        self._seen = present
        ready = [p for p, (_s, _m, since) in present.items() if now - since >= self.settle_s]
        ready.sort(key=lambda p: (present[p][1], p.name))
        cases = [p for p in ready if nifti_suffix(p.name)]
        others = [p for p in ready if not nifti_suffix(p.name)]
        return cases, others

    def forget(self, path: Path) -> None:
        """Drop a file that was taken."""
        self._seen.pop(path, None)


# --------------------------------------------------------------------------- window


@dataclass(frozen=True)
class WindowCase:
    """One scored case in a view's rolling window."""

    seq: int
    case_id: str
    phase: str
    vendor: str
    processed: str
    ood: bool
    pdc: float

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> WindowCase:
        """From a ledger ``case`` entry."""
        return cls(
            int(entry["seq"]),
            str(entry["case_id"]),
            str(entry.get("phase", "unknown")),
            str(entry.get("vendor", "")),
            str(entry["processed"]),
            bool(entry["ood"]),
            float(entry["decision_pdc"]),
        )


def window_stats(cases: list[WindowCase] | deque[WindowCase]) -> WindowStats:
    """Size, OoD fraction and median pDC of window cases."""
    w = RollingWindow(max(1, len(cases)))
    for c in cases:
        w.add(c.ood, c.pdc)
    return w.stats()


# --------------------------------------------------------------------------- the monitor


RefineFn = Callable[[Path, Path, Path, str, QcloopConfig], dict[str, Any]]


def _default_refine(
    window_dir: Path, run_dir: Path, out_run: Path, view: str, cfg: QcloopConfig
) -> dict[str, Any]:
    from qcloop.monitor.method.refine import refine_run

    return refine_run(window_dir, run_dir, out_run, cfg, views=[view])


@dataclass
class _ViewState:
    champion: Champion
    scorer: Any
    reference_median: float | None
    window: deque[WindowCase]
    last_alert_time: float | None = None
    cases_since_alert: int = 0
    pending: dict[str, Any] | None = None


class Monitor:
    """Scores an inbox of cases with champion models and refines them on drift.

    Args:
        inbox: folder of incoming cases.
        out: output folder (see the module docstring).
        cfg: configuration (``monitoring`` and ``registry`` sections are used here).
        champions: the model of each served view.
        registry: where challengers are registered and champions followed; ``None``: refined
            runs are written but not registered.
        metrics: Prometheus metrics to update (the monitor makes and activates its own when
            ``None``).
        runtime: ``"torch"`` or ``"onnxruntime"``.
        refinement: overrides the run's ``refinement`` section when refining.
        settle_s: seconds an inbox file must stay unchanged before it is taken.
        cooldown_s: after an alert for a view, seconds before the next one (and at least
            ``monitoring.min_cases`` new cases).
        reload_poll_s: how often the registry alias is checked for a new champion (0: never).
        refine_fn: runs the refinement (default :func:`qcloop.monitor.method.refine.refine_run`).
        clock: wall clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        inbox: str | Path,
        out: str | Path,
        cfg: QcloopConfig,
        champions: dict[str, Champion],
        *,
        registry: ModelRegistry | None = None,
        metrics: QcMetrics | None = None,
        runtime: str = "torch",
        refinement: RefinementConfig | None = None,
        settle_s: float = 1.0,
        cooldown_s: float = 600.0,
        reload_poll_s: float = 30.0,
        refine_fn: RefineFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not champions:
            raise ValueError("the monitor needs at least one champion model")
        self.inbox = Path(inbox)
        self.out = Path(out).resolve()
        self.cfg = cfg
        self.mcfg = cfg.monitoring
        self.limits = DriftLimits.from_config(cfg.monitoring)
        self.registry = registry
        self.runtime = runtime
        self.refinement = refinement
        self.cooldown_s = float(cooldown_s)
        self.reload_poll_s = float(reload_poll_s)
        self._refine_fn = refine_fn or _default_refine
        self._clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._last_reload = clock()
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.watcher = InboxWatcher(self.inbox, settle_s)
        self.records = JsonlLog(self.out / "records.jsonl")
        self.ledger = JsonlLog(self.out / "ledger.jsonl")
        self._own_metrics = metrics is None
        if metrics is None:
            from qcloop.plugins.prometheus.exporter import QcMetrics

            metrics = QcMetrics(window=self.mcfg.window).activate()
        self.metrics = metrics
        self._scorers: dict[tuple[str, str, str], Any] = {}
        self._done: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self.views: dict[str, _ViewState] = {}
        entries = self._recover()
        for view, champion in champions.items():
            self.views[view] = self._view_state(view, champion)
        self._restore_windows(entries)

    # ------------------------------------------------------------------ state

    def _recover(self) -> list[dict[str, Any]]:
        """Read the ledger; add entries for records a crash left without one."""
        entries = self.ledger.read()
        for e in entries:
            if e.get("event") == "case":
                self._done[e["sha256"]] = e
                self._seq = max(self._seq, int(e["seq"]))
        for rec in self.records.read():
            sha = rec.get("sha256")
            if sha and sha not in self._done:
                entry = self._ledger_entry(rec)
                log.warning("%s: record without ledger entry (crash); recovered", rec["case_id"])
                self.ledger.append(entry)
                entries.append(entry)
                self._done[sha] = entry
                self._seq = max(self._seq, int(entry["seq"]))
        return entries

    def _restore_windows(self, entries: list[dict[str, Any]]) -> None:
        """Each view's window from the ledger: its cases since the last reset that the current
        champion scored (a model promoted while the monitor was stopped starts a new window)."""
        for view, state in self.views.items():
            cases: list[WindowCase] = []
            last_alert: dict[str, Any] | None = None
            version = state.champion.version
            for e in entries:
                if e.get("view") != view:
                    continue
                kind = e.get("event")
                if kind == "case":
                    if str(e.get("model_version")) != version:
                        cases.clear()
                        continue
                    cases.append(WindowCase.from_entry(e))
                elif kind == "window_reset":
                    cases.clear()
                elif kind == "alert":
                    last_alert = e
                elif (
                    kind in ("refinement", "refinement_failed", "refinement_skipped")
                    and last_alert is not None
                ):
                    last_alert["_finished"] = True
            state.window.extend(cases[-self.mcfg.window :])
            self.metrics.restore_window(view, [(c.ood, c.pdc) for c in state.window])
            if last_alert is not None:
                state.last_alert_time = float(last_alert.get("unix_time", 0.0))
                state.cases_since_alert = sum(1 for c in cases if c.seq > last_alert.get("seq", 0))
                if last_alert.get("refine") and not last_alert.get("_finished"):
                    log.warning("%s: refinement requested before a restart; queued again", view)
                    state.pending = last_alert.get("alert") or {"view": view}

    def _view_state(self, view: str, champion: Champion) -> _ViewState:
        scorer = self._scorer(view, champion)
        reference = self._reference_median(view, champion, scorer)
        if reference is not None:
            self.metrics.set_reference_median(view, reference)
        return _ViewState(champion, scorer, reference, deque(maxlen=self.mcfg.window))

    def _scorer(self, view: str, champion: Champion) -> OnlineScorer:
        key = (view, champion.name, champion.version)
        if key not in self._scorers:
            from qcloop.monitor.ops.scoring import load_online_scorers

            self._scorers[key] = load_online_scorers(
                champion.run_dir, [view], runtime=self.runtime, model_info=champion.info()
            )[view]
        return self._scorers[key]

    def _reference_median(self, view: str, champion: Champion, scorer: Any) -> float | None:
        """Median decision pDC of the run's validation cases, scored once and cached in
        ``OUT/reference.json``; the midpoint of the pooled fences' quartiles when the run's
        training data are not available."""
        cache_path = self.out / "reference.json"
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        key = f"{view}|{champion.name}|{champion.version}|{Path(champion.run_dir).resolve()}"
        if key in cache:
            return float(cache[key]["median_pdc"])
        entry = reference_median(champion.run_dir, view, scorer)
        if entry is None:
            return None
        cache[key] = entry
        atomic.write_json(cache_path, cache)
        log.info(
            "%s: reference median decision pDC %.4f (%s, %d cases)",
            view,
            entry["median_pdc"],
            entry["source"],
            entry["cases"],
        )
        return float(entry["median_pdc"])

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
        returns how many were taken."""
        cases, others = self.watcher.scan()
        for path in others:
            self.watcher.forget(path)
            self._reject(path, None, "read", "not a NIfTI file (.nii or .nii.gz)")
        for path in cases:
            if self._stop.is_set():
                break
            self.watcher.forget(path)
            self.process_file(path)
            self.run_pending()
        return len(cases) + len(others)

    def process_file(self, path: Path) -> str:
        """Score one inbox file; returns ``"scored"``, ``"rejected"``, ``"recovered"`` or
        ``"duplicate"``."""
        try:
            sha = sha256_file(path)
        except FileNotFoundError:
            return "vanished"
        if sha in self._done:
            return self._finish_known(path, sha)
        try:
            ident = read_identity(path)
        except CaseError as exc:
            return self._reject(path, _sidecar_of(path), "read", exc.reason)
        if ident.view not in self.views:
            served = ", ".join(sorted(self.views))
            return self._reject(
                path, ident.sidecar, "read", f"a {ident.view} case; this monitor serves {served}"
            )
        from qcloop.monitor.data import load_case, save_label_map

        source = CaseSource(
            subject=ident.metadata.get("subject") or stem_of(path.name),
            view=ident.view,
            phase=ident.phase,
            image_path=path,
            gt_path=None,
            metadata={k: v for k, v in ident.metadata.items() if k != "subject"},
            layout="inbox",
        )
        try:
            case = load_case(source)
        except CaseError as exc:
            return self._reject(path, ident.sidecar, "read", exc.reason)
        state = self.views[ident.view]
        try:
            result = state.scorer.score(case)
        except CaseError as exc:
            return self._reject(path, ident.sidecar, "score", exc.reason)
        except Exception as exc:  # a scoring failure must not stop the loop
            log.exception("%s: scoring failed", path)
            return self._reject(path, ident.sidecar, "score", f"scoring failed: {exc!r}")
        seq = self._seq + 1
        case_id = f"{_SAFE.sub('_', stem_of(path.name))[:80]}-{sha[:10]}"
        phase_file = ident.phase if ident.phase in ("ED", "ES") else "ED"
        ext = nifti_suffix(path.name) or ".nii.gz"
        processed = f"processed/{ident.view}/{seq:06d}/{seq:06d}_{ident.view}_{phase_file}{ext}"
        mask = self.out / "masks" / f"{case_id}_pred.nii.gz"
        save_label_map(mask, result.labels, case)
        record = dict(result.record)
        record.update(
            {
                "image": str(self.out / processed),
                "source_file": path.name,
                "case_id": case_id,
                "seq": seq,
                "sha256": sha,
                "processed": processed,
                "mask": str(mask),
                "scored_at": _utc(),
            }
        )
        self.records.append(record)
        entry = self._ledger_entry(record)
        self.ledger.append(entry)
        self._seq = seq
        self._done[sha] = entry
        self._move_in(path, ident.sidecar, entry)
        from qcloop.monitor.core.plugin_manager import get_plugin_manager

        get_plugin_manager().notify_case_scored(record)
        self._after_case(ident.view, WindowCase.from_entry(entry))
        log.info(
            "%s: %s %s scored (OoD %s, decision pDC %.3f)",
            case_id,
            ident.view,
            ident.phase,
            entry["ood"],
            entry["decision_pdc"],
        )
        return "scored"

    def _ledger_entry(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "event": "case",
            "sha256": record["sha256"],
            "seq": int(record["seq"]),
            "case_id": record["case_id"],
            "view": record["view"],
            "phase": record.get("phase", "unknown"),
            "vendor": record.get("vendor", ""),
            "source_file": record["source_file"],
            "processed": record["processed"],
            "mask": record["mask"],
            "ood": bool(record.get("ood")),
            "decision_pdc": decision_pdc(record),
            "model_version": str((record.get("model") or {}).get("version", "")),
            "time": record.get("scored_at", _utc()),
        }

    def _move_in(self, path: Path, sidecar: Path | None, entry: dict[str, Any]) -> None:
        target = self.out / entry["processed"]
        move_file(path, target)
        if sidecar is not None and sidecar.exists():
            move_file(sidecar, target.with_name(f"{stem_of(target.name)}.source.json"))

    def _finish_known(self, path: Path, sha: str) -> str:
        entry = self._done[sha]
        target = self.out / entry["processed"]
        sidecar = _sidecar_of(path)
        if not target.exists():
            log.warning("%s: already scored as %s; finishing its move", path, entry["case_id"])
            self._move_in(path, sidecar, entry)
            return "recovered"
        dup = free_name(self.out / "duplicates", path.name, sha[:10])
        log.warning(
            "%s: same content as %s (scored before); moved to %s", path, entry["case_id"], dup
        )
        move_file(path, dup)
        if sidecar is not None:
            move_file(sidecar, dup.with_name(f"{stem_of(dup.name)}.json"))
        return "duplicate"

    def _reject(self, path: Path, sidecar: Path | None, stage: str, reason: str) -> str:
        target = free_name(self.out / "rejected", path.name, _utc().replace(":", ""))
        atomic.write_text(Path(f"{target}.reason.txt"), f"{path.name}: {reason}\n")
        with contextlib.suppress(FileNotFoundError):
            move_file(path, target)
        if sidecar is not None and sidecar.exists():
            move_file(sidecar, target.with_name(f"{stem_of(target.name)}.json"))
        self.metrics.case_error(stage)
        self.ledger.append(
            {
                "event": "rejected",
                "source_file": path.name,
                "stage": stage,
                "reason": reason,
                "rejected": str(target),
                "time": _utc(),
            }
        )
        log.warning("%s: rejected (%s): %s", path.name, stage, reason)
        return "rejected"

    # ------------------------------------------------------------------ drift

    def window_stats(self, view: str) -> WindowStats:
        """Statistics of the view's current rolling window."""
        with self._lock:
            return window_stats(self.views[view].window)

    def _after_case(self, view: str, case: WindowCase) -> None:
        with self._lock:
            state = self.views[view]
            state.window.append(case)
            state.cases_since_alert += 1
            decision = judge_drift(window_stats(state.window), state.reference_median, self.limits)
            if not decision.alert or not self._may_alert(state):
                return
            alert = {
                "view": view,
                "source": _SOURCE_QCLOOP,
                "reasons": list(decision.reasons),
                "window": decision.stats.to_dict(),
                "reference_median": decision.reference_median,
                "limits": {
                    "min_cases": self.limits.min_cases,
                    "ood_fraction_limit": self.limits.ood_fraction_limit,
                    "median_pdc_shift_limit": self.limits.median_pdc_shift_limit,
                },
                "model": state.champion.info(),
                "time": _utc(),
            }
            self._raise(view, alert)

    def _may_alert(self, state: _ViewState) -> bool:
        if state.pending is not None:
            return False
        if state.last_alert_time is None:
            return True
        cooled = self._clock() - state.last_alert_time >= self.cooldown_s
        return cooled and state.cases_since_alert >= self.limits.min_cases

    def _raise(self, view: str, alert: dict[str, Any]) -> None:
        """Record an alert, queue its refinement, broadcast it (called holding the lock, so
        that concurrent alerts of one view are coalesced)."""
        from qcloop.monitor.core.plugin_manager import get_plugin_manager

        with self._lock:
            state = self.views[view]
            state.last_alert_time = self._clock()
            state.cases_since_alert = 0
            refine = bool(self.mcfg.refine_on_alert)
            if refine:
                state.pending = alert
            self.ledger.append(
                {
                    "event": "alert",
                    "view": view,
                    "source": alert["source"],
                    "refine": refine,
                    "seq": self._seq,
                    "unix_time": state.last_alert_time,
                    "time": alert["time"],
                    "alert": alert,
                }
            )
        log.warning("%s: drift alert (%s): %s", view, alert["source"], "; ".join(alert["reasons"]))
        get_plugin_manager().notify_drift_alert(alert)

    def receive_alert(self, view: str, am_alert: dict[str, Any]) -> str:
        """Handle a firing alert from Alertmanager for ``view`` (webhook thread); returns the
        outcome: ``queued``, ``coalesced`` (a refinement is pending), ``cooldown`` or
        ``unknown view``."""
        with self._lock:
            state = self.views.get(view)
            if state is None:
                return f"unknown view {view!r} (serving {', '.join(sorted(self.views))})"
            if state.pending is not None:
                return "coalesced"
            if (
                state.last_alert_time is not None
                and self._clock() - state.last_alert_time < self.cooldown_s
            ):
                return "cooldown"
            labels = am_alert.get("labels", {})
            alert = {
                "view": view,
                "source": _SOURCE_ALERTMANAGER,
                "reasons": [
                    f"Alertmanager: {labels.get('alertname', '?')} firing"
                    + (
                        f" ({am_alert['annotations'].get('summary')})"
                        if isinstance(am_alert.get("annotations"), dict)
                        and am_alert["annotations"].get("summary")
                        else ""
                    )
                ],
                "window": window_stats(state.window).to_dict(),
                "reference_median": state.reference_median,
                "labels": labels,
                "model": state.champion.info(),
                "time": _utc(),
            }
            self._raise(view, alert)
        return "queued" if self.mcfg.refine_on_alert else "logged (refine_on_alert is off)"

    # ------------------------------------------------------------------ refinement

    def run_pending(self) -> None:
        """Run the refinements queued by alerts (inbox cases wait meanwhile)."""
        for view in list(self.views):
            with self._lock:
                alert = self.views[view].pending
            if alert is None:
                continue
            try:
                self.refine(view, alert)
            finally:
                with self._lock:
                    self.views[view].pending = None

    def refine(self, view: str, alert: dict[str, Any]) -> dict[str, Any] | None:
        """Refine the champion of ``view`` on its current window, register the result as a
        challenger and follow a promotion; returns the ledger event (``None`` if skipped)."""
        with self._lock:
            state = self.views[view]
            cases = list(state.window)
            champion = state.champion
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        window_id = f"{stamp}-{view}-{self._seq:06d}"
        if not cases:
            event = {
                "event": "refinement_skipped",
                "view": view,
                "reason": "empty window",
                "time": _utc(),
            }
            self.ledger.append(event)
            log.warning("%s: refinement skipped: the window is empty", view)
            return None
        window_dir = self.out / "windows" / window_id
        out_run = self.out / "runs" / f"{window_id}-refined"
        n_ood = sum(c.ood for c in cases)
        try:
            self._write_window(window_dir, view, cases, alert)
            cfg = self._refine_config(champion.run_dir)
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
            info = self._refine_fn(window_dir, champion.run_dir, out_run, view, cfg)
            refine_s = time.perf_counter() - t0
            summary = dict((info.get("views") or {}).get(view) or {})
            summary.pop("history", None)
            summary["seconds"] = round(refine_s, 3)
            from qcloop.monitor.core.plugin_manager import get_plugin_manager

            get_plugin_manager().notify_model_refined(view, str(out_run), summary)
            event: dict[str, Any] = {
                "event": "refinement",
                "view": view,
                "window_id": window_id,
                "window_dir": str(window_dir),
                "refined_run": str(out_run),
                "source": alert.get("source", _SOURCE_QCLOOP),
                "window_cases": len(cases),
                "window_ood": n_ood,
                "parent": champion.info(),
                "refine_summary": summary,
                "registered": None,
                "promoted": False,
                "time": _utc(),
            }
            if self.registry is not None:
                tags = {
                    "qcloop.window_id": window_id,
                    "qcloop.window_cases": str(len(cases)),
                    "qcloop.window_ood": str(n_ood),
                    "qcloop.alert_source": str(alert.get("source", _SOURCE_QCLOOP)),
                    "qcloop.alert_reasons": "; ".join(alert.get("reasons", []))[:500],
                }
                result = self.registry.register_and_gate(
                    out_run, champion, window_dir=window_dir, tags=tags
                )
                event["registered"] = _jsonable(result)
                if result.get("promoted"):
                    event["promoted"] = True
                    self.switch_champion(view, self.registry.champion(view))
        except Exception as exc:  # the monitor goes on serving the current champion
            log.exception("%s: refinement on window %s failed", view, window_id)
            event = {
                "event": "refinement_failed",
                "view": view,
                "window_id": window_id,
                "error": repr(exc),
                "time": _utc(),
            }
        self.ledger.append(event)
        return event

    def _refine_config(self, run_dir: Path) -> QcloopConfig:
        from qcloop.monitor.method.run_folder import load_run_config

        cfg = load_run_config(run_dir)
        if self.refinement is not None:
            cfg = cfg.model_copy(update={"refinement": self.refinement})
        return cfg

    def _write_window(
        self, window_dir: Path, view: str, cases: list[WindowCase], alert: dict[str, Any]
    ) -> None:
        """The window's inputs as an M&Ms-2 dataset folder (hard links) with its CSV."""
        rows = []
        for c in cases:
            src = self.out / c.processed
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
        atomic.write_json(window_dir / "alert.json", _jsonable(alert))

    def switch_champion(self, view: str, champion: Champion) -> None:
        """Serve ``view`` with ``champion`` from now on: new scorer, reference, empty window."""
        state = self._view_state(view, champion)
        with self._lock:
            old = self.views[view]
            state.last_alert_time = old.last_alert_time
            self.views[view] = state
            self.ledger.append(
                {
                    "event": "window_reset",
                    "view": view,
                    "model": champion.info(),
                    "previous": old.champion.info(),
                    "time": _utc(),
                }
            )
        self.metrics.reset_window(view)
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
            versions = self.registry.current_versions()
        except Exception:
            log.exception("cannot read the registry's current versions; keeping the models")
            return
        for view, version in versions.items():
            if view in self.views and version != self.views[view].champion.version:
                try:
                    self.switch_champion(view, self.registry.champion(view))
                except Exception:
                    log.exception(
                        "%s: cannot load version %s; keeping the current one", view, version
                    )

    def close(self) -> None:
        """Stop receiving events (when the metrics were made here)."""
        if self._own_metrics:
            self.metrics.deactivate()


def _sidecar_of(path: Path) -> Path | None:
    sidecar = path.with_name(f"{stem_of(path.name)}.json")
    return sidecar if sidecar.is_file() else None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def reference_median(run_dir: str | Path, view: str, scorer: Any) -> dict[str, Any] | None:
    """The reference median decision pDC of a run's view: the median over its validation cases
    (the cases its fences were calibrated on, from ``run.json``'s data folder) scored with
    ``scorer``; when those data are not available, the midpoint of the pooled fences' pDC
    quartiles. ``None`` when neither is available."""
    import statistics

    from qcloop.monitor.data import load_case
    from qcloop.monitor.method.cases import sources_for, split_labelled
    from qcloop.monitor.method.run_folder import load_run_config, read_run_info

    run = Path(run_dir)
    data = read_run_info(run).get("data")
    if data and Path(data).is_dir():
        cfg = load_run_config(run)
        try:
            _, val = split_labelled(sources_for(data, [view]), seed=cfg.seed)
        except CaseError as exc:
            log.warning("%s: validation cases unavailable (%s)", view, exc)
            val = []
        values = []
        for src in val:
            try:
                values.append(decision_pdc(scorer.score(load_case(src)).record))
            except CaseError as exc:
                log.warning("reference: %s skipped (%s)", src.image_path, exc)
        if values:
            return {
                "median_pdc": float(statistics.median(values)),
                "cases": len(values),
                "source": f"validation cases of {data}",
                "run": str(run.resolve()),
            }
    pooled = scorer.fences.get("all") if isinstance(scorer.fences, dict) else None
    if pooled is not None:
        d = pooled.to_dict() if hasattr(pooled, "to_dict") else dict(pooled)
        if "pdc_q1" in d and "pdc_q3" in d:
            log.warning(
                "%s: training data of %s not available; reference median approximated by the "
                "midpoint of the pooled fences' pDC quartiles",
                view,
                run,
            )
            return {
                "median_pdc": 0.5 * (float(d["pdc_q1"]) + float(d["pdc_q3"])),
                "cases": int(d.get("n_used", 0)),
                "source": "fences.json quartile midpoint",
                "run": str(run.resolve()),
            }
    log.warning("%s: no reference median; the median-shift rule is off", view)
    return None
