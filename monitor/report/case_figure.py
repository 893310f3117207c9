"""The per-case QC figure (after the paper's Figure 4): why was this case flagged?

For the slices where the prediction and the QC module's reconstruction disagree most, one row
each: the image, the prediction, the reconstruction (what the QC module thinks a plausible mask
near this one looks like) and their disagreement; the title gives the case, its pDC/pHD per
structure for the selected candidate, the fences and the reason for the flag. Arrays are a
prepared case on the run's grid, ``(Z, S, S)``, labels 0 bg, 1 LV, 2 MYO, 3 RV.

matplotlib (the ``report`` extra, Agg backend, headless) is imported when a figure is drawn.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np

from qcloop.monitor.core.optional import require

__all__ = [
    "FIGURE_CHOICES",
    "case_figure_png",
    "disagreement_slices",
    "flag_reason",
    "wants_figure",
]

#: ``--figures``: which cases get one.
FIGURE_CHOICES = ("flagged", "all", "none")
#: Label colours (RGBA) of LV, MYO, RV; background transparent.
_COLOURS = np.array(
    [[0, 0, 0, 0], [1.0, 0.25, 0.25, 0.55], [0.25, 0.9, 0.25, 0.55], [0.25, 0.6, 1.0, 0.55]]
)
_STRUCTURES = ("LV", "MYO", "RV")


def wants_figure(choice: str, ood: bool | None) -> bool:
    """Whether a case gets a figure under ``--figures choice``."""
    if choice not in FIGURE_CHOICES:
        raise ValueError(f"--figures must be one of {', '.join(FIGURE_CHOICES)}, got {choice!r}")
    return choice == "all" or (choice == "flagged" and bool(ood))


def disagreement_slices(
    prediction: np.ndarray, reconstruction: np.ndarray, k: int = 3
) -> list[int]:
    """Up to ``k`` slice indices, most disagreeing voxels first (ties: more foreground first),
    returned in slice order; slices where both are empty are left out unless all are."""
    differ = (prediction != reconstruction).reshape(len(prediction), -1).sum(1)
    foreground = ((prediction > 0) | (reconstruction > 0)).reshape(len(prediction), -1).sum(1)
    order = sorted(range(len(prediction)), key=lambda z: (-differ[z], -foreground[z], z))
    chosen = [z for z in order if foreground[z] > 0][:k] or order[:1]
    return sorted(chosen)


def _crop_box(masks: np.ndarray, margin: float = 0.4, minimum: int = 32) -> tuple[slice, slice]:
    """An in-plane box around the foreground of ``masks`` ``(n, S, S)`` with a margin (the
    heart fills a small part of the field of view); the whole plane when there is none."""
    rows, cols = np.nonzero(masks.any(0))
    size0, size1 = masks.shape[1:]
    if rows.size == 0:
        return slice(0, size0), slice(0, size1)
    box = []
    for lo, hi, n in ((rows.min(), rows.max() + 1, size0), (cols.min(), cols.max() + 1, size1)):
        half = max((hi - lo) * (1 + 2 * margin), minimum) / 2
        centre = (lo + hi) / 2
        start = int(max(0, min(n - 2 * half, centre - half)))
        box.append(slice(start, int(min(n, start + 2 * half))))
    return box[0], box[1]


def served_scores(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per structure, the scores QC gave the mask that was served: the selected candidate's,
    else (an average of candidates, or no selection) the best over candidates (largest pDC,
    smallest pHD), as the fences judge them."""
    candidates = record.get("candidates") or [{}]
    index = (record.get("selection") or {}).get("index")
    if isinstance(index, int) and 0 <= index < len(candidates):
        return candidates[index]
    out = {}
    for s in {name for c in candidates for name in c}:
        values = [c[s] for c in candidates if s in c]
        out[s] = {
            **values[0],
            "pdc": max(v["pdc"] for v in values),
            "phd_mm": min(v["phd_mm"] for v in values),
        }
    return out


def flag_reason(record: dict[str, Any]) -> str:
    """Why the case was (or was not) flagged, in words, from its record."""
    fences = record.get("fences") or {}
    structure = record.get("decision_structure", "RV")
    if record.get("ood") is None:
        return "not judged (the run has no fences)"
    low, high = fences.get("pdc_low"), fences.get("phd_high")
    values = []
    for c in record.get("candidates") or []:
        s = c.get(structure)
        if s is not None:
            values.append(f"pDC {s['pdc']:.2f}, pHD {s['phd_mm']:.1f} mm")
    verdict = "flagged OoD" if record["ood"] else "in distribution"
    rule = (
        f"every candidate has {structure} pDC < {low:.2f} or pHD > {high:.1f} mm"
        if record["ood"]
        else f"a candidate has {structure} pDC >= {low:.2f} and pHD <= {high:.1f} mm"
    ) if low is not None and high is not None else "fences unknown"  # fmt: skip
    return f"{verdict}: {rule} (candidates: {'; '.join(values)})"


def _title(record: dict[str, Any]) -> str:
    case = " ".join(str(record.get(k, "")) for k in ("subject", "view", "phase")).strip()
    scores = served_scores(record)
    parts = [
        f"{s} pDC {scores[s]['pdc']:.2f} pHD {scores[s]['phd_mm']:.1f} mm"
        for s in _STRUCTURES
        if s in scores
    ]
    reason = textwrap.fill(flag_reason(record), 120, subsequent_indent="  ")
    return f"{case or 'case'}: {', '.join(parts)}\n{reason}"


#: The disagreement colour (magenta).
_DIFFER = np.array([[0, 0, 0, 0], [1.0, 0.1, 1.0, 0.8]])


def _overlay(
    ax: Any,
    image: np.ndarray,
    labels: np.ndarray | None,
    title: str,
    colours: np.ndarray = _COLOURS,
) -> None:
    lo, hi = np.percentile(image, [0.5, 99.5])
    ax.imshow(image.T, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
    if labels is not None:
        ax.imshow(colours[np.clip(labels, 0, len(colours) - 1).T], interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def case_figure_png(
    image: np.ndarray,
    prediction: np.ndarray,
    reconstruction: np.ndarray,
    record: dict[str, Any],
    *,
    max_slices: int = 3,
    dpi: int = 80,
) -> bytes:
    """The figure of one case as PNG bytes (see the module docstring)."""
    require("matplotlib", "report", "case figures (--figures)")
    from matplotlib.figure import Figure

    if not image.shape == prediction.shape == reconstruction.shape:
        raise ValueError(
            f"image {image.shape}, prediction {prediction.shape} and reconstruction "
            f"{reconstruction.shape} must have one shape (Z, S, S)"
        )
    slices = disagreement_slices(prediction, reconstruction, max_slices)
    box = (slice(None), *_crop_box((prediction[slices] > 0) | (reconstruction[slices] > 0)))
    image, prediction, reconstruction = image[box], prediction[box], reconstruction[box]
    title = _title(record)
    head = 0.25 + 0.17 * title.count("\n")  # inches above the panels for the title's lines
    fig = Figure(figsize=(8.8, 2.4 * len(slices) + 0.5 + head), dpi=dpi)
    axes = np.atleast_2d(fig.subplots(len(slices), 4))
    for row, z in enumerate(slices):
        differ = (prediction[z] != reconstruction[z]).astype(np.int64)
        n = int(differ.sum())
        _overlay(axes[row, 0], image[z], None, f"slice {z}: image")
        _overlay(axes[row, 1], image[z], prediction[z], "prediction")
        _overlay(axes[row, 2], image[z], reconstruction[z], "QC reconstruction")
        _overlay(axes[row, 3], image[z], differ, f"disagreement ({n} px)", _DIFFER)
    fig.suptitle(title, fontsize=8, ha="left", x=0.01)
    top = 1 - (head + 0.45) / fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.16)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
