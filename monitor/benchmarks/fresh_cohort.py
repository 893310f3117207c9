"""Fresh cases for ``qcloop bench drift --fresh N``: a new phantom cohort, never seen by the run
or by the demo, scored exactly as the demo scores its test subjects.

``N`` vendor-A test subjects (in-distribution: the training vendor, all four diseases, as the
demo's vendor-A test split) and ``shifted`` subjects of each other vendor are generated with a
seed of their own, then every case (ED and ES of each view) is scored by the run's model set
with QC (the demo's ``M/M+QC``). What comes back is, per view and vendor, each case's OoD flag
and decision (RV) pDC in subject order: the stream the drift benchmark feeds the monitor's
policy, each case once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from qcloop.monitor.phantoms.cohort import PRESETS, CohortPreset, Group, write_cohort

__all__ = ["FRESH_SEED_OFFSET", "fresh_pools"]

#: Added to ``--seed``: the fresh cohort's seed never equals a demo's (whose default is 0).
FRESH_SEED_OFFSET = 1_000_003
#: The diseases of a test split (the demo's vendor-A test subjects include dilated RV).
TEST_DISEASES = ("NOR", "LV", "HCM", "DRV")

Case = tuple[bool, float]


def fresh_preset(reference: int, shifted: int, grid_of: str = "default") -> CohortPreset:
    """``reference`` vendor-A test subjects, then ``shifted`` test subjects of each of vendors
    B and C, on the image grid of the built-in preset ``grid_of`` (the run's training data's)."""
    if grid_of not in PRESETS:
        raise ValueError(f"unknown preset {grid_of!r}; choose one of {', '.join(PRESETS)}")
    groups = [Group("test", "A", reference, TEST_DISEASES)]
    groups += [Group("test", v, shifted, TEST_DISEASES) for v in ("B", "C") if shifted > 0]
    return CohortPreset("fresh", tuple(groups), 0, (), PRESETS[grid_of].grid)


def fresh_pools(
    run: Path,
    reference: int,
    shifted: int,
    *,
    seed: int = 0,
    grid_of: str = "default",
    work: Path | None = None,
    workers: int | None = None,
) -> dict[str, dict[str, list[Case]]]:
    """``{view: {vendor: [(ood, decision pDC), ...]}}`` of a freshly generated, scored cohort.

    Args:
        run: the run folder whose model set scores the cases.
        reference: vendor-A subjects (2 cases per view each).
        shifted: subjects of each of vendors B and C.
        seed: offset by :data:`FRESH_SEED_OFFSET` for the cohort's seed.
        grid_of: the built-in preset whose image grid the phantoms take.
        work: where the cohort is written (kept); ``None``: a temporary folder, removed.
        workers: phantom-rendering processes (``None``: every CPU).
    """
    from qcloop.monitor.cli.demo_run import evaluate_run
    from qcloop.monitor.method.run_folder import load_run_config

    cfg = load_run_config(run)
    with tempfile.TemporaryDirectory(prefix="qcloop-fresh-") as tmp:
        data = (work or Path(tmp)) / "data"
        preset = fresh_preset(reference, shifted, grid_of)
        write_cohort(data, preset, FRESH_SEED_OFFSET + seed, workers)
        evaluations = evaluate_run(run, data, cfg)
    pools: dict[str, dict[str, list[Case]]] = {}
    for e in evaluations:
        view, vendor = str(e.key["view"]), str(e.key["vendor"])
        case = (bool(e.ood), float(e.pseudo_m["RV"]["pdc"]))
        pools.setdefault(view, {}).setdefault(vendor, []).append(case)
    return pools
