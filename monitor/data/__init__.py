"""Cardiac MRI cases: discovery in the public layouts, validated loading, preprocessing for 2D
networks with an exact inverse, and writing label maps back on the original grid.

::

    from qcloop.monitor.data import Preprocessor, discover, load_cases, save_label_map

    sources = discover("MnM2/dataset", views=["SA"], where={"VENDOR": "A"})
    report = load_cases(sources)          # report.cases, report.errors
    pre = Preprocessor(size=128, target_spacing=1.5, divisor=16)
    prepared = pre.prepare(report.cases[0])
    labels = prepared.transform.restore_labels(network_labels)   # (X, Y, Z) on the original grid
    save_label_map("out/001_SA_ED.nii.gz", labels, report.cases[0])
"""

from __future__ import annotations

from qcloop.monitor.data.case import Case, CaseError, CaseSource, LoadReport
from qcloop.monitor.data.nifti import iter_cases, load_case, load_cases, save_label_map
from qcloop.monitor.data.preprocess import Prepared, Preprocessor, PreprocessTransform
from qcloop.monitor.data.readers import ACDC_LABELS, LAYOUTS, detect_layout, discover

__all__ = [
    "ACDC_LABELS",
    "LAYOUTS",
    "Case",
    "CaseError",
    "CaseSource",
    "LoadReport",
    "Prepared",
    "PreprocessTransform",
    "Preprocessor",
    "detect_layout",
    "discover",
    "iter_cases",
    "load_case",
    "load_cases",
    "save_label_map",
]
