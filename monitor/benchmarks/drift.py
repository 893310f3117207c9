"""``qcloop bench drift``: how often the monitor's drift policy alerts on in-distribution data,
and how many cases it needs to alert on a shifted vendor, under the ``fixed`` rule (window OoD
fraction above ``ood_fraction_limit``) and the ``binomial`` rule (the window's flags tested
against the model's leave-one-out reference flag rate at ``alert_alpha``).

The cases come from one of two sources. From a demo's ``evaluations.jsonl`` (its scored test
cases: OoD flag and decision pDC), streams are drawn with replacement: in-distribution from the
reference vendor's test cases, shifted from another vendor's. With ``fresh`` pools
(:mod:`~qcloop.monitor.benchmarks.fresh_cohort`: a new phantom cohort scored by the run), the
in-distribution stream is every fresh reference-vendor case once, in order, and the shifted
streams are drawn from the fresh cases of the other vendors. The policy is the monitor's: a rolling window of ``monitoring.window`` cases,
judged from ``min_cases`` on, after every case; after an alert, ``min_cases`` new cases before
the next (the cooldown counted in cases; the window is not reset, as when alerts do not refine).
The per-window test is the monitor's own :func:`~qcloop.monitor.ops.drift.judge_drift`, turned
into a table of critical flag counts per window size (checked against it).
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core.events import WindowStats
from qcloop.monitor.ops.drift import DriftLimits, FlagReference, judge_drift

__all__ = ["critical_flags", "run_drift_benchmark", "simulate_alerts"]

Case = tuple[bool, float]


def critical_flags(limits: DriftLimits, flags: FlagReference | None, window: int) -> list[int]:
    """``table[n]``: the fewest flagged cases of ``n`` that make the flag rule alert
    (``n + 1``: never; ``n < min_cases``: never), by asking :func:`judge_drift` itself."""
    table = []
    for n in range(window + 1):
        k_alert = n + 1
        for k in range(n + 1):
            stats = WindowStats(n, k / n if n else 0.0, None)
            if n >= limits.min_cases and judge_drift(stats, None, limits, flags).alert:
                k_alert = k
                break
        table.append(k_alert)
    return table


def simulate_alerts(
    stream: Sequence[Case],
    limits: DriftLimits,
    table: list[int],
    window: int,
    reference_median: float | None,
    *,
    median_rule: bool = True,
) -> list[int]:
    """The 0-based indices of the cases after which the monitor's policy alerts."""
    cases: deque[Case] = deque(maxlen=window)
    flagged, since, alerts = 0, None, []
    for i, case in enumerate(stream):
        if len(cases) == window:
            flagged -= cases[0][0]
        cases.append(case)
        flagged += case[0]
        since = None if since is None else since + 1
        n = len(cases)
        if n < limits.min_cases or (since is not None and since < limits.min_cases):
            continue
        alert = flagged >= table[n]
        if not alert and median_rule and reference_median is not None:
            median = statistics.median(p for _, p in cases)
            alert = median < reference_median - limits.median_pdc_shift_limit
        if alert:
            alerts.append(i)
            since = 0
    return alerts


def _pools(evaluations: Path, config: str, view: str) -> dict[str, list[Case]]:
    """(OoD flag, decision pDC) of each vendor's scored cases of one view."""
    pools: dict[str, list[Case]] = {}
    for line in evaluations.read_text().splitlines():
        row = json.loads(line)
        if row.get("config") == config and row.get("view") == view:
            case = (bool(row["ood"]), float(row["pseudo_M"]["RV"]["pdc"]))
            pools.setdefault(str(row["vendor"]), []).append(case)
    return pools


def _draw(pool: Sequence[Case], n: int, rng: np.random.Generator) -> list[Case]:
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def _rule_figures(
    pools: dict[str, list[Case]], limits: DriftLimits, flags: FlagReference | None,
    median: float | None, settings: dict[str, Any], rng: np.random.Generator,
) -> dict[str, Any]:  # fmt: skip
    """False alarms per 1000 in-distribution cases and cases to alert after a shift."""
    window, ref, draws = settings["window"], settings["reference_vendor"], settings["draws"]
    table = critical_flags(limits, flags, window)
    out: dict[str, Any] = {
        "critical_flags": {str(n): table[n] for n in (10, 20, 50) if n <= window}
    }
    # fresh: every case once, in the order it was generated; else one resampled stream (for
    # both variants)
    fresh = settings.get("fresh")
    in_distribution = list(pools[ref]) if fresh else _draw(pools[ref], draws, rng)
    draws = len(in_distribution)
    for use_median in (False, True):
        name = "flags+median" if use_median else "flags"
        alarms = simulate_alerts(
            in_distribution, limits, table, window, median, median_rule=use_median
        )
        out[f"false_alarms_per_1000[{name}]"] = 1000 * len(alarms) / draws
        for vendor in sorted(v for v in pools if v != ref):
            delays = []
            for _ in range(settings["repeats"]):
                warm = _draw(pools[ref], window, rng)
                shifted = _draw(pools[vendor], settings["max_cases"], rng)
                hits = simulate_alerts(warm + shifted, limits, table, window, median,
                                       median_rule=use_median)  # fmt: skip
                after = [i - window + 1 for i in hits if i >= window]
                delays.append(after[0] if after else settings["max_cases"] + 1)
            key = f"cases_to_alert[{name}][vendor {vendor}]"
            out[key] = {"median": float(np.median(delays)), "p90": float(np.percentile(delays, 90))}
    return out


def run_drift_benchmark(
    run: Path, evaluations: Path | None, *, config: str = "M/M+QC", reference_vendor: str = "A",
    draws: int = 100_000, repeats: int = 500, seed: int = 0, alpha: float | None = None,
    fresh: dict[str, dict[str, list[Case]]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Per view: the pool sizes, the reference flag rate and median, and per rule the false
    alarms per 1000 in-distribution cases and the cases to alert on each other vendor.

    ``fresh`` (from :func:`~qcloop.monitor.benchmarks.fresh_cohort.fresh_pools`) replaces
    ``evaluations``: the in-distribution stream is then its reference-vendor cases, each once."""
    if (evaluations is None) == (fresh is None):
        raise ValueError("give exactly one of evaluations and fresh pools")
    from qcloop.monitor.method.run_folder import load_run_config, run_views
    from qcloop.monitor.ops.reference import compute_reference, flag_reference

    cfg = load_run_config(run)
    base = DriftLimits.from_config(cfg.monitoring)
    if alpha is not None:
        base = _with(base, alert_alpha=alpha)
    settings = {"window": cfg.monitoring.window, "reference_vendor": reference_vendor,
                "draws": draws, "repeats": repeats, "max_cases": 500,
                "alert_alpha": base.alert_alpha, "fresh": fresh is not None}  # fmt: skip
    rng = np.random.default_rng(seed)
    figures: dict[str, Any] = {"settings": settings, "views": {}}
    for view in run_views(run):
        pools = fresh[view] if fresh is not None else _pools(evaluations, config, view)
        entry = compute_reference(run, view, scorer=None) or {}
        flags, median = flag_reference(entry), entry.get("median_pdc")
        view_fig: dict[str, Any] = {
            "in_distribution_cases": len(pools[reference_vendor]) if fresh else draws,
            "pool_sizes": {v: len(p) for v, p in sorted(pools.items())},
            "in_distribution_flag_rate": float(np.mean([o for o, _ in pools[reference_vendor]])),
            "reference_flags": None if flags is None else [flags.flagged, flags.cases],
            "reference_median": median,
        }
        for rule, limits in (("fixed", _with(base, rule="fixed")), ("binomial", base)):
            view_fig[rule] = _rule_figures(pools, limits, flags, median, settings, rng)
        figures["views"][view] = view_fig
    return figures


def _with(limits: DriftLimits, **changes: Any) -> DriftLimits:
    from dataclasses import replace

    return replace(limits, **changes)
