"""How often the monitored model's in-distribution cases are flagged: the reference flag rate
the drift rule tests a window against.

Fences fitted on the reference cases flag few of those very cases (they were fitted to them),
so the rate is measured leave-one-out: each reference case is judged by fences fitted on the
others, exactly as assessment judges a new case (its phase's fences, the pooled ones where its
phase has none). ``k`` of ``n`` flagged this way is what a new in-distribution case's flag
looks like, with the uncertainty of ``n`` cases that the drift rule keeps
(:func:`qcloop.monitor.ops.drift.judge_drift`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from qcloop.monitor.method.assessment import ScoredCase, fit_population_fences
from qcloop.monitor.method.selection import is_ood

__all__ = ["leave_one_out_flags"]


def leave_one_out_flags(
    scored: Sequence[ScoredCase], strategy: Any, phase_of: Callable[[ScoredCase], str]
) -> dict[str, int]:
    """``{"loo_flagged": k, "loo_cases": n}``: how many of the reference cases fences fitted
    on the other cases flag (cases no fences could be fitted for are not counted)."""
    flagged = counted = 0
    for i, case in enumerate(scored):
        others = [s for j, s in enumerate(scored) if j != i]
        fences = fit_population_fences(others, strategy, phase_of, skip_unfittable=True)
        pooled = fit_population_fences(others, strategy, lambda s: "all", skip_unfittable=True)
        judge = fences.get(phase_of(case)) or pooled.get("all")
        if judge is None:
            continue
        pdc, phd, _ = case.decision()
        flagged += int(is_ood(pdc, phd, judge))
        counted += 1
    return {"loo_flagged": flagged, "loo_cases": counted}


def reference_flags_of_run(run: Any, view: str) -> dict[str, int] | None:
    """:func:`leave_one_out_flags` of a run's validation cases (split as at training time,
    from the data folder ``run.json`` names), scored with the run's model set: for runs that
    recorded no rate in ``fences.json``. ``None`` without that data folder."""
    from pathlib import Path

    from qcloop.monitor.core.resolve import build_threshold_strategy
    from qcloop.monitor.data import CaseError
    from qcloop.monitor.method.assess import case_phase, make_assessor
    from qcloop.monitor.method.cases import (
        load_prepared,
        make_preprocessor,
        sources_for,
        split_labelled,
    )
    from qcloop.monitor.method.run_folder import load_model_set, load_run_config, read_run_info

    data = read_run_info(run).get("data")
    if not data or not Path(data).is_dir():
        return None
    cfg = load_run_config(run)
    model_set = load_model_set(run, view, cfg)
    try:
        _, val = split_labelled(sources_for(data, [view]), seed=cfg.seed)
    except CaseError:
        return None
    pre = make_preprocessor(cfg, getattr(model_set.best, "divisor", 1))
    assessor = make_assessor(model_set, cfg)
    scored = [
        assessor.score(c.key, c.prepared.image, c.net_spacing, c.origin)[0]
        for c in load_prepared(val, pre)
    ]
    if not scored:
        return None
    return leave_one_out_flags(scored, build_threshold_strategy(cfg), case_phase)
