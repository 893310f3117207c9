"""Cases on their way through the method: discovery by view, the labelled train/validation
split, loading with preprocessing, the record identity, and restoring a prediction to the
original grid."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcloop.monitor.core.config import QcloopConfig
from qcloop.monitor.core.progress import progress
from qcloop.monitor.data import Case, CaseError, CaseSource, discover, load_cases
from qcloop.monitor.data.preprocess import Prepared, Preprocessor, PreprocessTransform

log = logging.getLogger(__name__)


VAL_SPLITS = ("val", "validation")


#: The identity fields of a case's record, in order (see :func:`record_key`).
RECORD_KEY_FIELDS = ("subject", "view", "phase", "vendor", "disease", "image")


def record_key(src: CaseSource) -> dict[str, Any]:
    """Identity fields of a case's JSON record: subject, view, phase, vendor, disease, image."""
    return {
        "subject": src.subject,
        "view": src.view,
        "phase": src.phase,
        "vendor": src.vendor,
        "disease": src.disease,
        "image": str(src.image_path),
    }


@dataclass
class PreparedCase:
    """A loaded case and its network-grid version."""

    case: Case
    prepared: Prepared

    @property
    def key(self) -> dict[str, Any]:
        """Identity fields of the case's JSON record."""
        return record_key(self.case.source)

    @property
    def origin(self) -> tuple[Case, PreprocessTransform]:
        """The original case and the transform that prepared it (what a model qcloop did not
        train runs on)."""
        return self.case, self.prepared.transform

    @property
    def net_spacing(self) -> tuple[float, float, float]:
        """Spacing in the network array order ``(Z, X, Y)``."""
        sx, sy, sz = self.prepared.spacing
        return (sz, sx, sy)


def make_preprocessor(cfg: QcloopConfig, divisor: int = 1) -> Preprocessor:
    """The preprocessing of the configuration."""
    p = cfg.preprocessing
    return Preprocessor(
        size=p.size,
        target_spacing=p.target_spacing_mm,
        divisor=divisor,
        normalisation=p.normalisation,
    )


def load_prepared(
    sources: Sequence[CaseSource], preprocessor: Preprocessor, errors: list[CaseError] | None = None
) -> list[PreparedCase]:
    """Load and prepare cases; bad cases are logged, recorded in ``errors`` and skipped."""
    report = load_cases(sources)
    if errors is not None:
        errors.extend(report.errors)
    out = []
    for case in progress(report.cases, desc="preparing"):
        try:
            out.append(PreparedCase(case, preprocessor.prepare(case)))
        except (CaseError, ValueError) as exc:
            log.warning("%s: skipped (%s)", case.source.image_path, exc)
            if errors is not None:
                errors.append(
                    exc
                    if isinstance(exc, CaseError)
                    else CaseError(case.source.image_path, str(exc))
                )
    return out


def split_labelled(
    sources: Sequence[CaseSource], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[CaseSource], list[CaseSource]]:
    """Training and validation cases: by the ``split`` metadata when the layout has it, else a
    deterministic subject-level split of the labelled cases."""
    labelled = [s for s in sources if s.gt_path is not None]
    train = [s for s in labelled if s.split == "train"]
    val = [s for s in labelled if s.split in VAL_SPLITS]
    if train and val:
        return train, val
    subjects = sorted({s.subject for s in labelled})
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(subjects) * val_fraction)) if len(subjects) > 1 else 0
    val_subjects = set(rng.permutation(subjects)[:n_val].tolist())
    return (
        [s for s in labelled if s.subject not in val_subjects],
        [s for s in labelled if s.subject in val_subjects],
    )


def sources_for(
    data_dir: str | Path, views: Iterable[str], where: dict[str, Any] | None = None
) -> list[CaseSource]:
    """Discovered cases of ``views`` (optionally filtered by metadata)."""
    return [s for s in discover(data_dir, where=where) if s.view in set(views)]


#: Labelled data for a refinement: one folder (its training split anchors the refinement), or
#: a sequence whose first folder is split so and whose other folders (late ground truth, e.g.
#: a monitor's ``OUT/labelled``) are used whole.
Labelled = str | Path | Sequence[str | Path]


def labelled_sources(labelled: Labelled, view: str, seed: int = 0) -> list[CaseSource]:
    """The labelled cases of ``view`` a refinement anchors on (see :data:`Labelled`); an
    extra folder that does not exist (yet) adds nothing."""
    first, *extra = [labelled] if isinstance(labelled, (str, Path)) else list(labelled)
    train, _ = split_labelled(sources_for(first, [view]), seed=seed)
    for folder in extra:
        if Path(folder).is_dir():
            train += sources_for(folder, [view])
    return train


def restore_labels(item: PreparedCase, probs: np.ndarray) -> np.ndarray:
    """A network-grid softmax map restored to the original grid, as labels ``(X, Y, Z)``."""
    return item.prepared.transform.restore_probabilities(probs).argmax(-1).astype(np.uint8)


def compute_true(labels: np.ndarray, case: Case) -> dict[str, Any]:
    """True metrics of a restored prediction against the case's ground truth (original grid)."""
    from qcloop.monitor.method.segmentation_metrics import compute_metrics

    return compute_metrics(labels, case.gt, case.spacing)
