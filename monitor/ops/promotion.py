"""The model lifecycle the core drives through any :class:`ModelRegistry`, and the promotion
gate.

One registered model per view (``PREFIX-SA``, ``PREFIX-LA``); aliases ``champion``,
``challenger`` and ``previous-champion``. Registration is atomic from a user's view: the backend
returns only complete versions (files stored, tags set), and aliases move only after every
version of a registration is complete, so a crash leaves every alias where it was. This module
emits :class:`ModelVersionRegistered` and :class:`ModelVersionPromoted`; backends emit nothing.

The gate (:func:`evaluate_gate`) is documented in docs/tracking.md.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qcloop.monitor.core.events import ModelVersionPromoted, ModelVersionRegistered
from qcloop.monitor.core.interfaces import AliasMove, ModelRef, ModelRegistry
from qcloop.monitor.ops.run_package import (
    TAG_RUN_DIR,
    RegistryError,
    check_registration,
    check_run,
    read_run_info,
    recorded_folder,
    registered_name,
    run_views,
    view_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from qcloop.monitor.core.config import QcloopConfig
    from qcloop.monitor.ops.scoring import OnlineScorer

log = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GateDecision",
    "GateRecorder",
    "RegistryError",
    "ensure_champion",
    "evaluate_gate",
    "promote",
    "register",
    "register_and_gate",
    "registered_name",
    "rollback",
]

CHAMPION = "champion"
CHALLENGER = "challenger"
#: ``previous-<alias>`` marks the version an alias left.
PREVIOUS = "previous-"

TAG_PARENT_VERSION = "qcloop.parent_version"
TAG_PREVIOUS_CHAMPION = "qcloop.previous_champion"
TAG_ROLLED_BACK = "qcloop.rolled_back"
TAG_GATE_PASSED = "qcloop.gate.passed"
TAG_GATE = "qcloop.gate"


@dataclass
class GateDecision:
    """The promotion gate's verdict for one view, with the figures it was made on."""

    view: str
    passed: bool
    reasons: list[str]
    figures: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (figures are finite)."""
        return asdict(self)


@runtime_checkable
class GateRecorder(Protocol):
    """A registry that records a gate's figures in its own way (MLflow: as metrics of the
    version's registration run), beyond the verdict tags every registry gets."""

    def record_gate(self, ref: ModelRef, gate: GateDecision) -> None: ...


def _emit(event: ModelVersionRegistered | ModelVersionPromoted) -> None:
    from qcloop.monitor.core.plugin_manager import get_plugin_manager

    get_plugin_manager().emit(event)


# --------------------------------------------------------------------------- lifecycle


def _parent_tags(
    registry: ModelRegistry,
    info: Mapping[str, Any],
    views: Sequence[str],
    name_prefix: str,
    tags: Mapping[str, str] | None,
) -> dict[str, dict[str, str]]:
    """Per view the version the run was refined from (its ``run.json`` parent, found by
    content), unless the caller tags the parent itself."""
    parent = info.get("parent")
    if not parent or not Path(parent).is_dir() or TAG_PARENT_VERSION in (tags or {}):
        return {}
    try:
        found = registry.find(Path(parent), name_prefix=name_prefix)
    except ValueError:  # the contract's error for what a registry cannot use
        return {}
    return {v: {TAG_PARENT_VERSION: found[v].version} for v in views if v in found}


def register(
    registry: ModelRegistry,
    run_dir: Path,
    *,
    name_prefix: str,
    views: Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    view_tags: Mapping[str, Mapping[str, str]] | None = None,
    alias: str | None = CHALLENGER,
) -> dict[str, ModelRef]:
    """Register one new version per view of a run folder as ``PREFIX-<VIEW>``, tagged with its
    lineage (the backend's package tags, the parent version, then ``tags`` and
    ``view_tags[view]``); then move ``alias`` (``champion`` through :func:`promote`).

    Fires ``on_model_version_registered`` per version, before any alias moves.
    """
    run = Path(run_dir)
    info, chosen = check_registration(run, name_prefix, views)
    lineage = _parent_tags(registry, info, chosen, name_prefix, tags)
    merged = {v: {**lineage.get(v, {}), **dict((view_tags or {}).get(v) or {})} for v in chosen}
    refs = registry.register(
        run, name_prefix=name_prefix, views=chosen, tags=tags, view_tags=merged
    )
    for ref in refs.values():
        log.info("registered %s version %s", ref.name, ref.version)
        _emit(ModelVersionRegistered(ref.name, ref.version, dict(ref.tags)))
    for view, ref in refs.items():  # aliases last, once every version is complete
        if not alias:
            continue
        if alias == CHAMPION:
            move = promote(registry, ref.name, ref.version, alias=CHAMPION)
        else:
            move = registry.set_alias(ref.name, ref.version, alias)
        refs[view] = replace(ref, aliases=list(move.ref.aliases))
    return refs


def promote(
    registry: ModelRegistry, name: str, version: str, *, alias: str = CHAMPION
) -> AliasMove:
    """Move ``alias`` of model ``name`` to ``version`` (the version it leaves becomes
    ``previous-<alias>``); fires ``on_model_version_promoted`` when the alias moved."""
    move = registry.set_alias(name, version, alias)
    if move.moved:
        log.info(
            "%s: %s moved to version %s (was %s)",
            name,
            alias,
            move.ref.version,
            move.previous_version,
        )
        _emit(ModelVersionPromoted(name, move.ref.version, alias, move.previous_version))
    return move


def rollback(registry: ModelRegistry, name: str) -> AliasMove:
    """Move the champion of ``name`` back to the version it replaced; fires
    ``on_model_version_promoted``."""
    move = registry.rollback(name)
    log.info(
        "%s: champion rolled back from version %s to %s",
        name,
        move.previous_version,
        move.ref.version,
    )
    _emit(ModelVersionPromoted(name, move.ref.version, CHAMPION, move.previous_version))
    return move


def _alias_version(registry: ModelRegistry, name: str, alias: str) -> str | None:
    """The version ``alias`` of ``name`` points at, or None when no version carries it."""
    try:
        versions = registry.alias_versions(f"{name}@{alias}")
    except ValueError:  # the contract's error for an alias no version carries
        return None
    return next(iter(versions.values()), None)


def _local_ref(registry: ModelRegistry, name: str, version: str) -> ModelRef:
    """A version with the run folder it was registered from when that still holds exactly its
    files, else with the registry's verified copy."""
    row = registry.get_version(name, version)
    tags = {str(k): str(v) for k, v in dict(row.get("tags") or {}).items()}
    view = view_of(name, version, tags)
    local = recorded_folder(tags, view)
    if local is None:
        return registry.resolve(f"{name}/{version}")[view]
    return ModelRef(name, view, str(version), local, sorted(row.get("aliases") or []), tags)


def ensure_champion(
    registry: ModelRegistry, run_dir: Path, *, name_prefix: str
) -> dict[str, ModelRef]:
    """Make sure every view of ``run_dir`` is registered (found by content, else registered)
    and that each model has a champion (this run's version when none); return the current
    champions. Idempotent."""
    run = Path(run_dir)
    check_run(run)
    views = run_views(run)
    if not views:
        raise RegistryError(f"{run}: holds no trained view (no <VIEW>/candidates.json)")
    found = {v: r.version for v, r in registry.find(run, name_prefix=name_prefix).items()}
    missing = [v for v in views if v not in found]
    if missing:
        refs = register(registry, run, name_prefix=name_prefix, views=missing, alias=None)
        found.update({v: refs[v].version for v in missing})
    champions = {}
    for view in views:
        name = registered_name(name_prefix, view)
        version = _alias_version(registry, name, CHAMPION)
        if version is None:
            version = promote(registry, name, found[view], alias=CHAMPION).ref.version
        champions[view] = _local_ref(registry, name, version)
    return champions


def register_and_gate(
    registry: ModelRegistry,
    refined_run: Path,
    champions: dict[str, ModelRef],
    cfg: QcloopConfig,
    *,
    window_dir: Path,
    tags: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """Register a refined run as challenger, gate it against ``champions`` per view and apply
    ``cfg.registry.promotion``: ``auto`` promotes a passing challenger, ``approve`` leaves it as
    challenger with its gate result tagged (``qcloop models promote`` decides), ``off`` only
    registers (no gate). Returns per view ``{name, version, gate, promoted}``."""
    run = Path(refined_run)
    reg = cfg.registry
    views = [v for v in run_views(run) if v in champions]
    if not views:
        raise RegistryError(
            f"{run}: no view in common with the champions ({', '.join(sorted(champions)) or 'none'})"
        )
    # a version registered from this very folder before a crash is gated, not registered again
    # (a copy elsewhere with the same files is another registration)
    found = registry.find(run, name_prefix=reg.name_prefix)
    here = str(run.resolve())
    refs = {v: r for v, r in found.items() if v in views and r.tags.get(TAG_RUN_DIR) == here}
    for view, ref in refs.items():
        log.warning("%s: %s was registered before as version %s; gating it", view, run, ref.version)
    new = [v for v in views if v not in refs]
    if new:
        refs.update(
            register(
                registry,
                run,
                name_prefix=reg.name_prefix,
                views=new,
                tags=tags,
                view_tags={v: {TAG_PARENT_VERSION: champions[v].version} for v in new},
                alias=CHALLENGER,
            )
        )
    out: dict[str, dict[str, Any]] = {}
    for view in views:
        ref = refs[view]
        result: dict[str, Any] = {"name": ref.name, "version": ref.version, "gate": None}
        result["promoted"] = False
        if reg.promotion != "off":
            gate = evaluate_gate(
                ref,
                champions[view],
                view,
                window_dir=Path(window_dir),
                labelled_dir=None,
                dice_margin=reg.dice_margin,
            )
            result["gate"] = gate.to_dict()
            _record_gate(registry, ref, gate)
            if reg.promotion == "auto" and gate.passed:
                promote(registry, ref.name, ref.version, alias=CHAMPION)
                result["promoted"] = True
        out[view] = result
    return out


def _record_gate(registry: ModelRegistry, ref: ModelRef, gate: GateDecision) -> None:
    """The verdict as tags of the version; the figures too where the backend records them."""
    registry.set_tags(
        ref.name,
        ref.version,
        {
            TAG_GATE_PASSED: str(gate.passed).lower(),
            TAG_GATE: json.dumps(gate.to_dict(), allow_nan=False),
        },
    )
    if isinstance(registry, GateRecorder):
        registry.record_gate(ref, gate)


# --------------------------------------------------------------------------- the gate


def _as_run_dir(model: ModelRef | Path | str) -> Path:
    return model.run_dir if isinstance(model, ModelRef) else Path(model)


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return 0.0
    n = len(finite)
    return finite[n // 2] if n % 2 else 0.5 * (finite[n // 2 - 1] + finite[n // 2])


def _mean_fg_dice(labels: Any, gt: Any) -> float:
    from qcloop.monitor import STRUCTURES
    from qcloop.monitor.method.segmentation_metrics import dice_score

    return sum(dice_score(labels == v, gt == v) for v in STRUCTURES.values()) / len(STRUCTURES)


def _window_check(
    champ: OnlineScorer, chall: OnlineScorer, view: str, window_dir: Path
) -> tuple[bool, str, dict[str, float]]:
    """Gate part 1: OoD counts and median decision pDC of both sets on the drift window."""
    from qcloop.monitor.data import CaseError, discover, load_case

    ood = {"champion": 0, "challenger": 0}
    pdcs: dict[str, list[float]] = {"champion": [], "challenger": []}
    skipped = 0
    for src in discover(window_dir, views=[view]):
        try:
            case = load_case(src)
            results = {"champion": champ.score(case), "challenger": chall.score(case)}
        except CaseError as exc:
            log.warning("gate: %s skipped (%s)", src.image_path, exc)
            skipped += 1
            continue
        for who, r in results.items():
            ood[who] += int(r.ood)
            pdcs[who].append(float(r.scored.best()[0]))
    n_window = len(pdcs["champion"])
    figures = {
        "window_cases": float(n_window),
        "window_skipped": float(skipped),
        "champion_ood": float(ood["champion"]),
        "challenger_ood": float(ood["challenger"]),
        "champion_median_pdc": _median(pdcs["champion"]),
        "challenger_median_pdc": _median(pdcs["challenger"]),
    }
    if n_window == 0:
        return False, f"no readable {view} case in the drift window {window_dir}", figures
    fewer = ood["challenger"] < ood["champion"]
    tie_better = (
        ood["challenger"] == ood["champion"]
        and figures["challenger_median_pdc"] > figures["champion_median_pdc"]
    )
    passed = fewer or tie_better
    reason = (
        f"QC on the drift window {'passes' if passed else 'fails'}: {ood['challenger']} vs "
        f"{ood['champion']} of {n_window} cases OoD, median pDC "
        f"{figures['challenger_median_pdc']:.4f} vs {figures['champion_median_pdc']:.4f} "
        "(challenger vs champion)"
    )
    return passed, reason, figures


def _dice_check(
    champ: OnlineScorer,
    chall: OnlineScorer,
    view: str,
    data: Any,
    champion_dir: Path,
    dice_margin: float,
) -> tuple[bool, str, dict[str, float]]:
    """Gate part 2: mean foreground Dice of the QC-selected masks on labelled validation
    data may not drop by more than ``dice_margin``."""
    from qcloop.monitor.data import CaseError, load_case
    from qcloop.monitor.method.cases import sources_for, split_labelled
    from qcloop.monitor.method.run_folder import load_run_config

    if not data or not Path(data).is_dir():
        return (
            False,
            f"no labelled validation data to check Dice on ({data or 'none recorded'})",
            {},
        )
    cfg = load_run_config(champion_dir)
    _, val = split_labelled(sources_for(data, [view]), seed=cfg.seed)
    dice: dict[str, list[float]] = {"champion": [], "challenger": []}
    for src in val:
        try:
            case = load_case(src)
            for who, scorer in (("champion", champ), ("challenger", chall)):
                dice[who].append(_mean_fg_dice(scorer.score(case).labels, case.gt))
        except CaseError as exc:
            log.warning("gate: validation case %s skipped (%s)", src.image_path, exc)
    n_val = min(len(dice["champion"]), len(dice["challenger"]))
    figures = {"val_cases": float(n_val)}
    if n_val == 0:
        return False, f"no readable labelled {view} validation case in {data}", figures
    cp = sum(dice["champion"][:n_val]) / n_val
    ch = sum(dice["challenger"][:n_val]) / n_val
    figures.update({"champion_val_dice": cp, "challenger_val_dice": ch, "val_dice_drop": cp - ch})
    passed = ch >= cp - dice_margin - 1e-12
    reason = (
        f"validation Dice {'passes' if passed else 'fails'}: {ch:.4f} vs {cp:.4f} on {n_val} "
        f"case(s) (allowed drop {dice_margin:.4f})"
    )
    return passed, reason, figures


def evaluate_gate(
    challenger: ModelRef | Path,
    champion: ModelRef | Path,
    view: str,
    *,
    window_dir: Path,
    labelled_dir: Path | None,
    dice_margin: float,
) -> GateDecision:
    """Whether a challenger may replace the champion for ``view``.

    1. Drift window (every ``view`` case under ``window_dir``): both model sets score each case
       against the CHAMPION's reference fences. The challenger passes when it flags fewer cases
       OoD, or as many with a strictly higher median decision pDC (best candidate per case).
    2. Labelled validation data (the validation split of ``labelled_dir``, default the
       champion's training data from ``run.json``): the mean foreground Dice (LV, MYO, RV) of
       the QC-selected masks may not drop by more than ``dice_margin``.

    Both must pass. Cases that cannot be read are skipped and counted.
    """
    from qcloop.monitor.ops.scoring import load_online_scorers

    if not (isinstance(dice_margin, int | float) and 0.0 <= dice_margin <= 1.0):
        raise ValueError(f"dice_margin must be in [0, 1], got {dice_margin!r}")
    ch_dir, cp_dir = _as_run_dir(challenger), _as_run_dir(champion)
    for d in (ch_dir, cp_dir):
        check_run(d)
    champ = load_online_scorers(cp_dir, [view])[view]
    chall = load_online_scorers(ch_dir, [view])[view]
    chall.fences = champ.fences  # one yardstick: the champion's reference fences
    qc_pass, qc_reason, figures = _window_check(champ, chall, view, window_dir)
    data = labelled_dir or read_run_info(cp_dir).get("data")
    dice_pass, dice_reason, dice_figures = _dice_check(
        champ, chall, view, data, cp_dir, dice_margin
    )
    figures.update(dice_figures)
    figures = {k: float(v) for k, v in figures.items() if math.isfinite(float(v))}
    return GateDecision(
        view=view,
        passed=bool(qc_pass and dice_pass),
        reasons=[qc_reason, dice_reason],
        figures=figures,
    )
