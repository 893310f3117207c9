"""Where the cases of a batch job come from: a dataset folder, a glob within one, or a CSV or
Parquet list of cases (an archive's export, one row per case).

A case list names its files; discovery never reads pixel data. Columns (paths relative to the
list's folder, or absolute):

- ``image`` (required): the image NIfTI file;
- ``view`` (required): ``SA`` or ``LA``;
- ``phase``: ``ED``, ``ES`` or a frame name (default ``ED``); ``frame``: the 0-based index in a
  4D file;
- ``subject``: the subject code (default: the image's file name without its extension);
- ``gt``: a ground-truth NIfTI file in qcloop's labels (0 bg, 1 LV, 2 MYO, 3 RV), or empty;
- every other column (``vendor``, ``disease``, ``split``, ...) is metadata, as in the layouts.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Collection, Mapping
from pathlib import Path

from qcloop.monitor.data.case import CaseError, CaseSource
from qcloop.monitor.data.readers import discover, filter_sources

__all__ = ["LIST_SUFFIXES", "find_cases", "read_case_list"]

#: File suffixes read as case lists.
LIST_SUFFIXES = (".csv", ".parquet")
_GLOB_CHARS = set("*?[")
_REQUIRED = ("image", "view")
_KNOWN = {"image", "view", "phase", "frame", "subject", "gt"}
_NORMALISED = ("vendor", "disease", "split")


def find_cases(
    spec: str | os.PathLike[str],
    *,
    where: Mapping[str, str | Collection[str]] | None = None,
) -> list[CaseSource]:
    """The cases ``spec`` names: a dataset folder (:func:`discover`), a CSV/Parquet case list
    (:func:`read_case_list`), or a glob of image files inside a dataset folder (the folder's
    cases whose image matches, with the layout's metadata); filtered by ``where``.

    Raises:
        CaseError: nothing usable at ``spec`` (names the path and the problem).
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        return discover(path, where=where)
    if path.suffix.lower() in LIST_SUFFIXES:
        if not path.is_file():
            raise CaseError(path, "case list not found")
        return filter_sources(read_case_list(path), None, None, where)
    if _GLOB_CHARS & set(text):
        return _globbed(text, where)
    raise CaseError(path, "not a dataset folder, a .csv/.parquet case list or a glob")


def _globbed(pattern: str, where: Mapping[str, str | Collection[str]] | None) -> list[CaseSource]:
    """The cases of the dataset folder above ``pattern`` whose image file matches it."""
    parts = Path(pattern).parts
    fixed = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    matched = {Path(p).resolve() for p in glob.glob(pattern, recursive=True)}
    if not matched:
        raise CaseError(pattern, "the glob matches no file")
    sources = [s for s in discover(root, where=where) if s.image_path.resolve() in matched]
    if not sources:
        raise CaseError(pattern, f"the glob matches files, but no case image of {root}")
    return sources


def read_case_list(path: str | os.PathLike[str]) -> list[CaseSource]:
    """The cases of a CSV or Parquet case list (columns in the module's docstring), sorted by
    key; a row without a required column, or whose image is missing, is an error naming the
    list, the row and the problem."""
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix.lower() == ".parquet" else _csv_rows(path)
    if not rows:
        raise CaseError(path, "the case list has no rows")
    missing = [c for c in _REQUIRED if c not in rows[0]]
    if missing:
        raise CaseError(path, f"the case list has no column {', '.join(missing)}")
    sources = [_row_source(path, n, row) for n, row in enumerate(rows, start=2)]
    keys = [s.key for s in sources]
    dup = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
    if dup:
        raise CaseError(path, f"cases listed more than once: {', '.join(dup[:5])}")
    return sorted(sources, key=lambda s: (s.subject, s.view, s.phase))


def _csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [
                {k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CaseError(path, f"cannot read the case list ({exc})") from exc


def _parquet_rows(path: Path) -> list[dict[str, str]]:
    from qcloop.monitor.core.optional import require

    require("pyarrow", "ray", "Parquet case lists")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds for a bad file
        raise CaseError(path, f"cannot read the case list ({exc})") from exc
    return [
        {k: "" if v is None else str(v).strip() for k, v in row.items()}
        for row in table.to_pylist()
    ]


def _row_source(path: Path, line: int, row: dict[str, str]) -> CaseSource:
    """One listed case (``line``: its row's number in the CSV, header = 1)."""
    where = f"row {line}"
    image = _listed_file(path, row.get("image", ""), f"{where}: image")
    view = row.get("view", "").upper()
    if view not in ("SA", "LA"):
        raise CaseError(path, f"{where}: view must be SA or LA, not {row.get('view')!r}")
    gt = _listed_file(path, row["gt"], f"{where}: gt") if row.get("gt") else None
    frame = row.get("frame") or None
    if frame is not None and not frame.isdigit():
        raise CaseError(path, f"{where}: frame must be a 0-based index, not {frame!r}")
    subject = row.get("subject") or image.name.split(".nii")[0]
    return CaseSource(
        subject=subject,
        view=view,
        phase=row.get("phase") or "ED",
        image_path=image,
        gt_path=gt,
        metadata=_metadata(row),
        layout="list",
        frame=int(frame) if frame is not None else None,
    )


def _metadata(row: dict[str, str]) -> dict[str, str]:
    """The row's other columns, plus the normalised ``vendor``, ``disease`` and ``split`` keys
    the layouts give (from a column of that name in any case, e.g. ``VENDOR``)."""
    meta = {k: v for k, v in row.items() if k not in _KNOWN}
    for key in _NORMALISED:
        value = next((v for k, v in meta.items() if k.lower() == key and v), None)
        if value is not None:
            meta[key] = value
    return meta


def _listed_file(path: Path, value: str, what: str) -> Path:
    if not value:
        raise CaseError(path, f"{what} is empty")
    file = Path(value) if Path(value).is_absolute() else path.parent / value
    if not file.is_file():
        raise CaseError(path, f"{what} {value!r} not found")
    return file
