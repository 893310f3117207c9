"""Phantom cardiac MRI cohorts: qcloop runs end to end with no downloaded data.

One parameter set per subject (:func:`sample_anatomy`) drives a short-axis stack and a
4-chamber long-axis slice at ED and ES; a vendor's acquisition chain (:func:`sample_chain`,
:func:`sample_geometry`) turns it into images. :func:`write_cohort` writes whole cohorts in the
M&Ms-2 layout; see docs/data.md.
"""

from __future__ import annotations

from qcloop.monitor.phantoms.anatomy import DISEASES, Anatomy, sample_anatomy
from qcloop.monitor.phantoms.appearance import VENDORS, ImagingChain, VendorPreset, sample_chain
from qcloop.monitor.phantoms.cohort import (
    CSV_COLUMNS,
    LADDER,
    PRESETS,
    CohortPreset,
    CohortSummary,
    Group,
    SubjectRecord,
    plan_cohort,
    write_cohort,
)
from qcloop.monitor.phantoms.views import (
    Geometry,
    GridSpec,
    SubjectImages,
    render_subject,
    sample_geometry,
)

__all__ = [
    "CSV_COLUMNS",
    "DISEASES",
    "LADDER",
    "PRESETS",
    "VENDORS",
    "Anatomy",
    "CohortPreset",
    "CohortSummary",
    "Geometry",
    "GridSpec",
    "Group",
    "ImagingChain",
    "SubjectImages",
    "SubjectRecord",
    "VendorPreset",
    "plan_cohort",
    "render_subject",
    "sample_anatomy",
    "sample_chain",
    "sample_geometry",
    "write_cohort",
]
