"""Masks that another tool wrote: which mask belongs to which case (by the subject, view and
phase in its file name, or by a CSV of ``image,mask`` pairs), the label values it uses, and the
mask read back on its image's grid in qcloop's labels (0 bg, 1 LV, 2 MYO, 3 RV)."""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from qcloop.monitor.data import Case, CaseError, CaseSource
from qcloop.monitor.data.nifti import AFFINE_TOLERANCE_MM

log = logging.getLogger(__name__)

#: qcloop's own label values: 0 background, 1 LV, 2 MYO, 3 RV.
DEFAULT_LABELS: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 3}
_NAMES = {"BG": 0, "BACKGROUND": 0, "LV": 1, "MYO": 2, "RV": 3}
_LABEL_NAMES = {0: "BG", 1: "LV", 2: "MYO", 3: "RV"}
_TOKEN_SPLIT = re.compile(r"[^0-9A-Za-z]+")


@dataclass(frozen=True)
class MaskMatch:
    """A case and the mask file that holds its segmentation."""

    source: CaseSource
    mask: Path


def parse_label_map(text: str | None) -> dict[int, int]:
    """Mask value -> qcloop label from ``"1:RV,2:MYO,3:LV"`` (names LV, MYO, RV, BG or the
    label numbers 0-3; ``"4:0"`` or ``"4:BG"`` maps a value to background). Value 0 is
    background unless mapped; ``None`` or an empty text is qcloop's own order."""
    if text is None or not text.strip():
        return dict(DEFAULT_LABELS)
    out = {0: 0}
    given: set[int] = set()
    for item in (p.strip() for p in text.split(",")):
        value, sep, name = (s.strip() for s in item.partition(":"))
        if not sep or not value.isdigit():
            raise ValueError(f"label map item {item!r}: expected VALUE:NAME, e.g. 1:RV")
        label = int(name) if name.isdigit() else _NAMES.get(name.upper())
        if label not in _LABEL_NAMES:
            raise ValueError(f"label map item {item!r}: {name!r} is not one of LV, MYO, RV, BG")
        if int(value) in given:
            raise ValueError(f"label map gives mask value {value} twice")
        given.add(int(value))
        out[int(value)] = label
    return out


def describe_label_map(label_map: Mapping[int, int]) -> str:
    """``"0:BG, 1:RV, 2:MYO, 3:LV"``: a label map as its text form."""
    return ", ".join(f"{v}:{_LABEL_NAMES[label]}" for v, label in sorted(label_map.items()))


def match_by_name(
    sources: Sequence[CaseSource], masks_dir: str | os.PathLike[str]
) -> tuple[list[MaskMatch], list[CaseError]]:
    """Each case's mask under ``masks_dir``: the NIfTI file whose name holds the case's
    subject, view and phase as tokens (``001_SA_ED.nii.gz``, ``001_SA_ED_pred.nii.gz``), or
    every token of the image's own name (and the phase, for cine files). The dataset's image
    files never count as masks. A case with no mask, several masks, or a mask that several cases
    claim is an error naming the file."""
    root = Path(masks_dir)
    images = {s.image_path.resolve() for s in sources}
    files = [p for p in _nifti_files(root) if p.resolve() not in images]
    index: dict[str, set[int]] = {}
    for i, path in enumerate(files):
        for token in _tokens(path.name):
            index.setdefault(token, set()).add(i)
    found: dict[CaseSource, list[int]] = {}
    for src in sources:
        hits: set[int] = set()
        for wanted in _wanted_tokens(src):
            hits |= set.intersection(*(index.get(t, set()) for t in wanted))
        found[src] = sorted(hits)
    claims: dict[int, list[CaseSource]] = {}
    for src, hits in found.items():
        for i in hits:
            claims.setdefault(i, []).append(src)
    matches: list[MaskMatch] = []
    errors: list[CaseError] = []
    for src, hits in found.items():
        if not hits:
            errors.append(CaseError(src.image_path, f"no mask for this case under {root}", src.key))
        elif len(hits) > 1:
            names = ", ".join(files[i].name for i in hits)
            reason = f"several masks match {src.key}: {names}; keep one or give a mapping CSV"
            errors.append(CaseError(files[hits[0]], reason, src.key))
        elif len(claims[hits[0]]) > 1:
            keys = ", ".join(s.key for s in claims[hits[0]])
            reason = f"the mask's name matches several cases ({keys}); give a mapping CSV"
            errors.append(CaseError(files[hits[0]], reason, src.key))
        else:
            matches.append(MaskMatch(src, files[hits[0]]))
    unused = len(files) - len({m.mask for m in matches})
    if unused:
        log.info("%s: %d NIfTI file(s) matched no case of the chosen views", root, unused)
    return matches, errors


def match_by_csv(
    sources: Sequence[CaseSource], mapping_csv: str | os.PathLike[str]
) -> tuple[list[MaskMatch], list[CaseError]]:
    """Each row's case and mask from a CSV with columns ``image,mask`` (paths relative to the
    CSV's folder, or absolute; an optional ``phase`` column picks the phase of a cine file).
    A row whose image is not a case, or whose mask does not exist, is an error naming it."""
    path = Path(mapping_csv)
    rows = _read_rows(path)
    by_image: dict[Path, list[CaseSource]] = {}
    for src in sources:
        by_image.setdefault(src.image_path.resolve(), []).append(src)
    matches: list[MaskMatch] = []
    errors: list[CaseError] = []
    seen: set[str] = set()
    for line, row in rows:
        where = f"{path.name} line {line}"
        image = (path.parent / row["image"]).resolve()
        cases = [s for s in by_image.get(image, []) if row.get("phase") in (None, "", s.phase)]
        if len(cases) != 1:
            why = "is not an image of a case" if not cases else "has several phases; add a phase"
            errors.append(CaseError(image, f"{where}: the image {why}"))
            continue
        src, mask = cases[0], path.parent / row["mask"]
        if src.key in seen:
            errors.append(CaseError(mask, f"{where}: {src.key} is listed twice", src.key))
        elif not mask.is_file():
            errors.append(CaseError(mask, f"{where}: mask file not found", src.key))
        else:
            matches.append(MaskMatch(src, mask))
        seen.add(src.key)
    return matches, errors


def read_mask(path: Path, case: Case, label_map: Mapping[int, int]) -> np.ndarray:
    """The mask at ``path`` as qcloop labels ``(X, Y, Z)`` uint8 on the grid of ``case``'s
    image; ``CaseError`` naming the mask when it cannot be read, its shape or affine differs
    from the image's (affine within ``AFFINE_TOLERANCE_MM``), or it holds an unmapped value."""
    try:
        nii = nib.load(path)
    except Exception as exc:  # nibabel raises several unrelated types for a bad file
        raise CaseError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(nii, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(path, f"not a NIfTI image ({type(nii).__name__})")
    index = _volume_index(tuple(int(n) for n in nii.shape), case, path)
    try:
        raw = np.asanyarray(nii.dataobj[index])
    except Exception as exc:  # truncated or corrupt voxel data
        raise CaseError(path, f"cannot read voxel data ({type(exc).__name__}: {exc})") from exc
    raw = raw[:, :, np.newaxis] if raw.ndim == 2 else raw
    affine = np.asarray(nii.affine, dtype=np.float64)
    if not np.allclose(affine, case.affine, rtol=1e-6, atol=AFFINE_TOLERANCE_MM):
        diff = float(np.nanmax(np.abs(affine - case.affine)))
        raise CaseError(
            path,
            f"mask affine differs from the affine of its image {case.source.image_path.name} "
            f"by up to {diff:.4g} (tolerance {AFFINE_TOLERANCE_MM:g} mm)",
        )
    return _map_values(raw, label_map, path)


def _volume_index(shape: tuple[int, ...], case: Case, path: Path) -> tuple[object, ...]:
    """The index that reads the case's ``(X, Y[, Z])`` volume from a mask file of ``shape``
    (the case's frame of a cine mask); ``CaseError`` when the shapes disagree."""
    frame = case.source.frame
    extra = shape[3:]
    if frame is not None and len(shape) >= 4 and shape[3] > 1 and frame < shape[3]:
        volume, index = shape[:3], (slice(None),) * 3 + (frame,) + (0,) * (len(shape) - 4)
        extra = shape[4:]
    else:
        volume, index = shape[:3], (slice(None),) * min(3, len(shape)) + (0,) * len(extra)
    volume = (*volume, 1) if len(volume) == 2 else volume
    if any(n != 1 for n in extra) or volume != case.shape:
        raise CaseError(
            path,
            f"mask shape {shape} does not match the shape {case.shape} of its image "
            f"{case.source.image_path.name}",
        )
    return index


def _map_values(raw: np.ndarray, label_map: Mapping[int, int], path: Path) -> np.ndarray:
    """Mask values mapped to qcloop labels; ``CaseError`` for a value the map does not name."""
    values = np.unique(raw)
    if values.size and not (
        np.issubdtype(values.dtype, np.integer)
        or (np.all(np.isfinite(values)) and np.all(values == np.rint(values)))
    ):
        raise CaseError(path, "mask values are not whole numbers (a probability map?)")
    bad = [v for v in values.tolist() if int(v) not in label_map]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10])
        raise CaseError(
            path,
            f"mask value(s) {shown} not in the label map ({describe_label_map(label_map)}); "
            f"map them with --label-map, e.g. '{int(bad[0])}:BG' for background",
        )
    out = np.zeros(raw.shape, dtype=np.uint8)
    for value, label in label_map.items():
        if label:
            out[raw == value] = label
    return out


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The CSV's rows with their line numbers, keys lower-cased; ``CaseError`` without the
    ``image`` and ``mask`` columns."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(path, f"unreadable CSV ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    columns = {str(c).strip().lower() for c in reader.fieldnames or []}
    if not {"image", "mask"} <= columns:
        raise CaseError(path, f"a mapping CSV needs the columns image,mask; it has {columns}")
    return [
        (i + 2, {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k})
        for i, row in enumerate(reader)
    ]


def _nifti_files(root: Path) -> list[Path]:
    """Every NIfTI file under ``root`` (hidden folders left out), in a stable order."""
    if not root.is_dir():
        raise CaseError(root, "masks folder not found")
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder, n) for n in sorted(names) if n.endswith((".nii", ".nii.gz")))
    return found


def _tokens(name: str) -> set[str]:
    """The case-folded alphanumeric tokens of a NIfTI file name, without its extension."""
    stem = re.sub(r"\.nii(\.gz)?$", "", name)
    return {t.casefold() for t in _TOKEN_SPLIT.split(stem) if t}


def _wanted_tokens(src: CaseSource) -> Iterable[set[str]]:
    """Token sets any of which names the case in a mask's file name."""
    yield {src.subject.casefold(), src.view.casefold(), src.phase.casefold()}
    own = _tokens(src.image_path.name)
    yield own | {src.phase.casefold()} if src.frame is not None else own
