"""Finding the cases of a dataset folder in the public layouts (M&Ms-2, M&Ms-1, ACDC).

Discovery is cheap: it reads file names, CSV tables and Info.cfg files, never pixel data.

Layouts (labels are mapped to qcloop's 0 bg, 1 LV, 2 MYO, 3 RV when a case is loaded):

- ``mnms2``: ``NNN/NNN_{SA,LA}_{ED,ES}.nii.gz`` with ``..._gt.nii.gz`` beside, or the same files
  flat in one folder; ``NNN_*_CINE`` files are ignored. ``dataset_information.csv`` (in the folder
  or its parent) gives SUBJECT_CODE, DISEASE, VENDOR, SCANNER, FIELD (and SPLIT in qcloop's
  phantoms). Without a SPLIT column the official split is used: subjects 1-160 train, 161-200
  validation, 201-360 test. Labels 1 LV, 2 MYO, 3 RV.
- ``mnms1``: ``CODE/CODE_sa.nii.gz`` 4D cine files with ``CODE_sa_gt.nii.gz`` (under
  Training/Labeled, Validation, Testing). ED and ES are 0-based frame indices taken from the
  challenge CSV (``211230_M&Ms_Dataset_information_diagnosis_opendataset.csv`` or an earlier
  ``*M&Ms_Dataset_Information*.csv``): columns "External code", "VendorName", "Vendor",
  "Centre", "ED", "ES" (and Age, Pathology, Sex, Height, Weight in the 2021 version); any CSV in
  the folder or its parent with an "External code" column is used. Labels 1 LV, 2 MYO, 3 RV.
- ``acdc``: ``patientNNN/patientNNN_frameFF.nii.gz`` + ``_gt`` with ``Info.cfg`` (ED, ES, Group,
  Height, Weight, NbFrame; ED/ES are the 1-based FF of the file names). Labels are reversed in
  ACDC (1 RV, 2 MYO, 3 LV) and are mapped.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path

from qcloop.monitor.data.case import CaseError, CaseSource

__all__ = ["ACDC_LABELS", "LAYOUTS", "detect_layout", "discover", "filter_sources"]

logger = logging.getLogger(__name__)

#: ACDC file value -> qcloop label (ACDC: 1 RV, 2 MYO, 3 LV).
ACDC_LABELS: tuple[int, int, int, int] = (0, 3, 2, 1)

_MNMS2 = re.compile(r"^(?P<subject>\d+)_(?P<view>SA|LA)_(?P<phase>ED|ES)\.nii(?:\.gz)?$")
_MNMS1 = re.compile(r"^(?P<subject>[A-Za-z0-9]+)_sa\.nii(?:\.gz)?$")
_ACDC = re.compile(r"^(?P<subject>patient\d+)_frame(?P<frame>\d+)\.nii(?:\.gz)?$")
_SPLIT_FOLDERS = {"training": "train", "validation": "validation", "testing": "test"}
MNMS2_CSV = "dataset_information.csv"


def discover(
    root: str | os.PathLike[str],
    layout: str = "auto",
    *,
    views: Iterable[str] | None = None,
    phases: Iterable[str] | None = None,
    where: Mapping[str, str | Collection[str]] | None = None,
) -> list[CaseSource]:
    """The cases under ``root``, sorted by key, optionally filtered.

    Args:
        root: the dataset folder.
        layout: ``"mnms2"``, ``"mnms1"``, ``"acdc"`` or ``"auto"`` (detected from file names).
        views: keep only these views (``"SA"``, ``"LA"``; one string or several).
        phases: keep only these phases (``"ED"``, ``"ES"``, ...; one string or several).
        where: keep only cases whose metadata matches every item; a value is a string, or a
            collection of accepted strings. Keys are matched exactly, else case-insensitively.

    Raises:
        CaseError: ``root`` is not a folder, holds no case of the layout, or matches several
            layouts under ``"auto"``.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise CaseError(folder, "dataset folder not found")
    files = _nifti_files(folder)
    name = detect_layout(folder, files) if layout == "auto" else layout
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
    sources = _dedupe(LAYOUTS[name](folder, files))
    if not sources:
        raise CaseError(folder, f"no {name} cases found in this folder")
    found = len(sources)
    sources = filter_sources(sources, views, phases, where)
    if not sources:
        logger.warning("%s: none of the %d %s cases passes the filters", folder, found, name)
    return sorted(sources, key=lambda s: (s.subject, s.view, s.phase))


def detect_layout(root: Path, files: list[Path] | None = None) -> str:
    """The one layout whose file names appear under ``root``; ``CaseError`` if none or several."""
    names = [p.name for p in (files if files is not None else _nifti_files(root))]
    patterns = {"mnms2": _MNMS2, "mnms1": _MNMS1, "acdc": _ACDC}
    found = [layout for layout, rx in patterns.items() if any(rx.match(n) for n in names)]
    if not found:
        raise CaseError(root, "no cases found: no file matches the mnms2, mnms1 or acdc layout")
    if len(found) > 1:
        raise CaseError(root, f"several layouts found ({', '.join(found)}); pass layout=")
    logger.info("%s: detected layout %s", root, found[0])
    return found[0]


def _mnms2(root: Path, files: list[Path]) -> list[CaseSource]:
    table = _mnms2_table(root)
    sources = []
    missing: set[str] = set()
    for path in files:
        m = _MNMS2.match(path.name)
        if not m:
            continue
        subject = m["subject"]
        row = table.get(_code(subject), {})
        if table and not row and subject not in missing:
            missing.add(subject)
            logger.warning("%s: subject %s is not in %s", root, subject, MNMS2_CSV)
        metadata = dict(row)
        metadata["vendor"] = row.get("VENDOR", "")
        metadata["disease"] = row.get("DISEASE", "")
        metadata["split"] = row.get("SPLIT") or _mnms2_official_split(subject)
        sources.append(
            CaseSource(
                subject=subject,
                view=m["view"],
                phase=m["phase"],
                image_path=path,
                gt_path=_beside(path, "_gt"),
                metadata=metadata,
                layout="mnms2",
            )
        )
    return sources


def _mnms1(root: Path, files: list[Path]) -> list[CaseSource]:
    table = _mnms1_table(root)
    sources = []
    for path in files:
        m = _MNMS1.match(path.name)
        if not m:
            continue
        subject = m["subject"]
        row = table.get(subject)
        if row is None:
            logger.warning("%s: no ED/ES frames for %s in the M&Ms-1 CSV; skipped", path, subject)
            continue
        metadata = dict(row)
        metadata["vendor"] = row.get("Vendor", "")
        metadata["disease"] = row.get("Pathology", "")
        metadata["split"] = _split_from_path(root, path)
        for phase in ("ED", "ES"):
            try:
                frame = int(float(row[phase]))
            except (KeyError, ValueError):
                logger.warning(
                    "%s: %s frame of %s is %r; skipped", path, phase, subject, row.get(phase)
                )
                continue
            sources.append(
                CaseSource(
                    subject=subject,
                    view="SA",
                    phase=phase,
                    image_path=path,
                    gt_path=_beside(path, "_gt"),
                    metadata=dict(metadata),
                    layout="mnms1",
                    frame=frame,
                )
            )
    return sources


def _acdc(root: Path, files: list[Path]) -> list[CaseSource]:
    infos: dict[Path, dict[str, str]] = {}
    sources = []
    for path in files:
        m = _ACDC.match(path.name)
        if not m:
            continue
        if path.parent not in infos:
            infos[path.parent] = _read_info_cfg(path.parent / "Info.cfg")
        info = infos[path.parent]
        frame = int(m["frame"])
        phase = f"frame{m['frame']}"
        for name in ("ED", "ES"):
            if _as_int(info.get(name)) == frame:
                phase = name
        metadata = dict(info)
        metadata["vendor"] = ""
        metadata["disease"] = info.get("Group", "")
        metadata["split"] = _split_from_path(root, path)
        sources.append(
            CaseSource(
                subject=m["subject"],
                view="SA",
                phase=phase,
                image_path=path,
                gt_path=_beside(path, "_gt"),
                metadata=metadata,
                layout="acdc",
                label_map=ACDC_LABELS,
            )
        )
    return sources


#: Layout name -> reader of (root, NIfTI files under root).
LAYOUTS: dict[str, Callable[[Path, list[Path]], list[CaseSource]]] = {
    "mnms2": _mnms2,
    "mnms1": _mnms1,
    "acdc": _acdc,
}


def _nifti_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder, n) for n in sorted(names) if n.endswith((".nii", ".nii.gz")))
    return found


def _beside(image: Path, tag: str) -> Path | None:
    stem = image.name[: -len(".nii.gz")] if image.name.endswith(".gz") else image.name[:-4]
    for ext in (".nii.gz", ".nii"):
        candidate = image.with_name(f"{stem}{tag}{ext}")
        if candidate.is_file():
            return candidate
    return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(path, f"unreadable CSV ({exc})") from exc
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:4096], ",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = csv.DictReader(text.splitlines(), dialect=dialect)
    return [
        {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in rows
    ]


def _code(subject: str) -> str:
    return str(int(subject)) if subject.isdigit() else subject


def _mnms2_table(root: Path) -> dict[str, dict[str, str]]:
    for folder in (root, root.parent):
        path = folder / MNMS2_CSV
        if path.is_file():
            rows = _read_csv(path)
            return {_code(r["SUBJECT_CODE"]): r for r in rows if r.get("SUBJECT_CODE")}
    logger.warning("%s: no %s here or in the parent folder; no metadata", root, MNMS2_CSV)
    return {}


def _mnms2_official_split(subject: str) -> str:
    number = int(subject)
    if 1 <= number <= 160:
        return "train"
    if number <= 200:
        return "validation"
    return "test" if number <= 360 else ""


def _mnms1_table(root: Path) -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for folder in (root, root.parent):
        # Newest first: the challenge CSVs are named by date (201014_..., 211230_...).
        for path in sorted(folder.glob("*.csv"), reverse=True):
            rows = _read_csv(path)
            if not rows or "External code" not in rows[0]:
                continue
            logger.info("M&Ms-1 metadata from %s", path)
            for row in rows:
                table.setdefault(row["External code"], row)
        if table:
            break
    if not table:
        logger.warning("%s: no M&Ms-1 CSV with an 'External code' column found", root)
    return table


def _read_info_cfg(path: Path) -> dict[str, str]:
    if not path.is_file():
        logger.warning("%s: missing; frames get no ED/ES phase", path)
        return {}
    info = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            info[key.strip()] = value.strip()
    return info


def _as_int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def _split_from_path(root: Path, path: Path) -> str:
    for part in path.relative_to(root).parts[:-1][::-1] + root.parts[::-1]:
        split = _SPLIT_FOLDERS.get(part.lower())
        if split:
            return split
    return ""


def _dedupe(sources: list[CaseSource]) -> list[CaseSource]:
    seen: dict[str, CaseSource] = {}
    for source in sources:
        if source.key in seen:
            logger.warning(
                "%s: duplicate of %s (%s); kept the first",
                source.image_path,
                source.key,
                seen[source.key].image_path,
            )
            continue
        seen[source.key] = source
    return list(seen.values())


def filter_sources(
    sources: list[CaseSource],
    views: Iterable[str] | None,
    phases: Iterable[str] | None,
    where: Mapping[str, str | Collection[str]] | None,
) -> list[CaseSource]:
    view_set = None if views is None else _upper_set(views)
    phase_set = None if phases is None else _upper_set(phases)
    kept = []
    for s in sources:
        if view_set is not None and s.view.upper() not in view_set:
            continue
        if phase_set is not None and s.phase.upper() not in phase_set:
            continue
        if where and not all(_matches(s.metadata, k, v) for k, v in where.items()):
            continue
        kept.append(s)
    return kept


def _upper_set(values: Iterable[str]) -> set[str]:
    return {values.upper()} if isinstance(values, str) else {v.upper() for v in values}


def _matches(metadata: Mapping[str, str], key: str, wanted: str | Collection[str]) -> bool:
    if key in metadata:
        value = metadata[key]
    else:
        folded = {k.casefold(): v for k, v in metadata.items()}
        if key.casefold() not in folded:
            return False
        value = folded[key.casefold()]
    accepted = {wanted} if isinstance(wanted, str) else {str(w) for w in wanted}
    return value.strip() in {a.strip() for a in accepted}
