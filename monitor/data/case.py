"""The case nouns: where a case lives (``CaseSource``), the case itself (``Case``) and why a case
could not be read (``CaseError``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IDENTITY_LABELS", "Case", "CaseError", "CaseSource", "LoadReport"]

#: Label lookup table for layouts that already use qcloop's convention (0 bg, 1 LV, 2 MYO, 3 RV).
IDENTITY_LABELS: tuple[int, int, int, int] = (0, 1, 2, 3)


class CaseError(Exception):
    """A case that cannot be discovered, read or trusted; names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], reason: str, key: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        #: the case's ``"subject/view/phase"`` when the error concerns one case.
        self.key = key
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason, self.key))


@dataclass(frozen=True)
class CaseSource:
    """Where one (subject, view, phase) lives on disk, and what is known about it; no pixel data.

    Attributes:
        subject: subject code as the layout spells it (``"001"``, ``"A0S9V9"``, ``"patient001"``).
        view: ``"SA"`` (short axis) or ``"LA"`` (long axis).
        phase: ``"ED"``, ``"ES"`` or another frame name (``"frame05"``).
        image_path: the image NIfTI file.
        gt_path: the ground-truth NIfTI file, or ``None`` for an unlabelled case.
        metadata: every CSV / Info.cfg column of the subject as strings, plus the normalised keys
            ``vendor``, ``disease`` and ``split`` where the layout knows them.
        layout: the reader that found the case (``"mnms2"``, ``"mnms1"``, ``"acdc"``).
        frame: index along the 4th axis for 4D (cine) files; ``None`` for 3D files.
        label_map: lookup table from the file's label values to qcloop's (index = file value).
    """

    subject: str
    view: str
    phase: str
    image_path: Path
    gt_path: Path | None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    layout: str = "nifti"
    frame: int | None = None
    label_map: tuple[int, ...] = IDENTITY_LABELS

    @property
    def key(self) -> str:
        """``"subject/view/phase"``, unique within a dataset."""
        return f"{self.subject}/{self.view}/{self.phase}"

    @property
    def vendor(self) -> str:
        """Scanner vendor from the metadata, ``"unknown"`` when the layout does not say."""
        return self.metadata.get("vendor") or "unknown"

    @property
    def split(self) -> str:
        """Dataset split from the metadata (``"train"``, ``"validation"``, ``"test"``) or
        ``"unknown"``."""
        return self.metadata.get("split") or "unknown"

    @property
    def disease(self) -> str:
        """Diagnosis / pathology group from the metadata, ``"unknown"`` when not given."""
        return self.metadata.get("disease") or "unknown"


@dataclass(eq=False)
class Case:
    """One loaded, validated case on its original grid.

    Attributes:
        source: where it came from.
        image: float32 ``(X, Y, Z)`` intensities (a 2D slice is stored with ``Z = 1``).
        gt: uint8 ``(X, Y, Z)`` labels in qcloop's convention (0 bg, 1 LV, 2 MYO, 3 RV), or ``None``.
        spacing: voxel size in mm along X, Y, Z, from the header zooms.
        affine: 4x4 voxel-to-world matrix of the image.
        header: the image's nibabel header, used to write predictions back.
    """

    source: CaseSource
    image: np.ndarray
    gt: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    header: Any

    @property
    def key(self) -> str:
        """``"subject/view/phase"``."""
        return self.source.key

    @property
    def subject(self) -> str:
        """Subject code."""
        return self.source.subject

    @property
    def view(self) -> str:
        """``"SA"`` or ``"LA"``."""
        return self.source.view

    @property
    def phase(self) -> str:
        """``"ED"``, ``"ES"`` or another frame name."""
        return self.source.phase

    @property
    def vendor(self) -> str:
        """Scanner vendor, ``"unknown"`` when the layout does not say."""
        return self.source.vendor

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape ``(X, Y, Z)``."""
        x, y, z = self.image.shape
        return (int(x), int(y), int(z))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0


@dataclass
class LoadReport:
    """What a batch load produced: the good cases, and one ``CaseError`` per skipped case."""

    cases: list[Case] = field(default_factory=list)
    errors: list[CaseError] = field(default_factory=list)
