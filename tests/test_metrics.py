"""Tests of qcloop.monitor.method.segmentation_metrics against MONAI, a brute-force scipy reference and hand values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.spatial.distance import cdist

from qcloop.monitor.method.segmentation_metrics import (
    StructureScores,
    compute_metrics,
    dice_score,
    fov_diagonal_mm,
    hausdorff,
)

NAMES = ("LV", "MYO", "RV")


def blob_label_map(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random smooth blobs of labels 1, 2, 3 (several components each, touching borders)."""
    sigma = 2.0 if len(shape) == 2 else (2.0, 2.0, 0.7)
    label = np.zeros(shape, dtype=np.int64)
    for value in (1, 2, 3):
        field = ndimage.gaussian_filter(rng.random(shape), sigma)
        label[(field > np.quantile(field, 0.85)) & (label == 0)] = value
    return label


def monai_hd(pred: np.ndarray, ref: np.ndarray, spacing, percentile) -> np.ndarray:
    """MONAI's HD (or HD-percentile) of labels 1, 2, 3, from one-hot tensors."""
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")

    def one_hot(label: np.ndarray):
        return torch.from_numpy(np.stack([label == k for k in range(4)])[None].astype(np.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = metrics.compute_hausdorff_distance(
            one_hot(pred), one_hot(ref), percentile=percentile, spacing=list(spacing)
        )
    return out[0].numpy().astype(np.float64)


def brute_force_hd(pred: np.ndarray, ref: np.ndarray, spacing, percentile: float) -> float:
    """Edges by scipy erosion, all pairwise distances by cdist, float64 percentiles."""
    scale = np.asarray(spacing, dtype=np.float64)
    pred_edges = np.argwhere(ndimage.binary_erosion(pred) ^ pred) * scale
    ref_edges = np.argwhere(ndimage.binary_erosion(ref) ^ ref) * scale
    pairwise = cdist(pred_edges, ref_edges)
    return float(
        max(
            np.percentile(pairwise.min(axis=1), percentile),
            np.percentile(pairwise.min(axis=0), percentile),
        )
    )


# qcloop, like MONAI, interpolates percentiles in float32 (rank included); the brute-force
# reference works in float64, so percentiles agree to float32 interpolation error only.
F32_TOL = {"rel": 1e-5, "abs": 1e-4}

CASES = [
    ((64, 80), (1.25, 1.4), 0),
    ((64, 80), (1.25, 1.4), 1),
    ((72, 64), (1.25, 1.4), 2),
    ((40, 48, 8), (1.3, 1.3, 10.0), 3),
    ((48, 40, 7), (1.3, 1.3, 10.0), 4),
]


@pytest.mark.parametrize(("shape", "spacing", "seed"), CASES)
def test_matches_monai(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    pred, ref = blob_label_map(shape, rng), blob_label_map(shape, rng)
    scores = compute_metrics(pred, ref, spacing)
    expected_hd = monai_hd(pred, ref, spacing, None)
    expected_hd95 = monai_hd(pred, ref, spacing, 95)
    assert list(scores) == list(NAMES)
    for i, name in enumerate(NAMES):
        assert not scores[name].penalised
        assert abs(scores[name].hd - expected_hd[i]) <= 1e-6, name
        assert abs(scores[name].hd95 - expected_hd95[i]) <= 1e-6, name
        assert scores[name].hd95 <= scores[name].hd


@pytest.mark.parametrize(("shape", "spacing", "seed"), CASES)
def test_matches_brute_force_and_binary_api(shape, spacing, seed):
    rng = np.random.default_rng(100 + seed)
    pred, ref = blob_label_map(shape, rng), blob_label_map(shape, rng)
    scores = compute_metrics(pred, ref, spacing)
    for name, value in zip(NAMES, (1, 2, 3), strict=True):
        p, r = pred == value, ref == value
        for percentile, got in ((100.0, scores[name].hd), (95.0, scores[name].hd95)):
            expected = brute_force_hd(p, r, spacing, percentile)
            assert got == pytest.approx(expected, **F32_TOL)
            assert hausdorff(p, r, spacing, percentile) == got
        overlap = np.count_nonzero(p & r)
        assert scores[name].dice == pytest.approx(2 * overlap / (p.sum() + r.sum()), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    three_d=st.booleans(),
    background=st.floats(0.0, 0.9),
    spacing=st.tuples(st.floats(0.5, 3.0), st.floats(0.5, 3.0), st.floats(1.0, 10.0)),
)
def test_small_maps_match_brute_force(seed, three_d, background, spacing):
    rng = np.random.default_rng(seed)
    shape = (9, 8, 4) if three_d else (13, 11)
    spacing = spacing if three_d else spacing[:2]
    weights = [background] + [(1.0 - background) / 3] * 3
    pred_map = rng.choice(4, size=shape, p=weights)
    ref_map = rng.choice(4, size=shape, p=weights)
    scores = compute_metrics(pred_map, ref_map, spacing)
    for name, value in zip(NAMES, (1, 2, 3), strict=True):
        p, r = pred_map == value, ref_map == value
        got = scores[name]
        assert math.isfinite(got.hd) and math.isfinite(got.hd95) and math.isfinite(got.dice)
        assert got.penalised == (p.any() != r.any())
        if p.any() and r.any():
            assert got.hd == pytest.approx(brute_force_hd(p, r, spacing, 100), rel=1e-6)
            assert got.hd95 == pytest.approx(brute_force_hd(p, r, spacing, 95), **F32_TOL)


def test_hand_made_squares():
    ref = np.zeros((32, 32), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[10:15, 10:15] = 1  # 25 voxels, rows 10-14
    pred[13:18, 10:15] = 1  # shifted 3 rows: rows 13-17, overlap 2 rows = 10 voxels
    scores = compute_metrics(pred, ref, (2.0, 1.0))
    assert scores["LV"].dice == pytest.approx(2 * 10 / 50)
    assert scores["LV"].hd == pytest.approx(6.0)  # bottom row 17 to row 14, 3 rows x 2 mm
    assert scores["MYO"] == StructureScores(dice=1.0, hd=0.0, hd95=0.0, penalised=False)


def test_single_voxels_distance_in_mm():
    pred = np.zeros((20, 20), dtype=np.uint8)
    ref = np.zeros_like(pred)
    ref[5, 5] = 3
    pred[8, 9] = 3
    expected = math.sqrt((3 * 1.25) ** 2 + (4 * 1.4) ** 2)
    scores = compute_metrics(pred, ref, (1.25, 1.4))
    assert scores["RV"].hd == pytest.approx(expected, rel=1e-6)
    assert scores["RV"].hd95 == pytest.approx(expected, rel=1e-6)
    assert scores["RV"].dice == 0.0
    assert not scores["RV"].penalised


def test_structures_follow_label_convention():
    ref = np.zeros((24, 24), dtype=np.uint8)
    ref[2:8, 2:8] = 1  # LV
    ref[10:14, 10:14] = 2  # MYO
    ref[16:22, 16:22] = 3  # RV
    pred = ref.copy()
    pred[pred == 3] = 0  # the prediction misses the RV only
    scores = compute_metrics(pred, ref, (1.0, 1.0))
    assert scores["LV"].dice == 1.0 and scores["LV"].hd == 0.0
    assert scores["MYO"].dice == 1.0 and scores["MYO"].hd == 0.0
    assert scores["RV"].dice == 0.0 and scores["RV"].penalised
    only_rv = compute_metrics(pred, ref, (1.0, 1.0), structures=("RV",))
    assert list(only_rv) == ["RV"]


def test_empty_masks_rules_and_default_penalty():
    shape, spacing = (64, 48), (1.25, 1.4)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[10:20, 10:20] = 1
    pred = np.zeros_like(ref)
    diagonal = math.hypot(64 * 1.25, 48 * 1.4)
    scores = compute_metrics(pred, ref, spacing)
    assert scores["LV"] == StructureScores(dice=0.0, hd=diagonal, hd95=diagonal, penalised=True)
    assert scores["RV"] == StructureScores(dice=1.0, hd=0.0, hd95=0.0, penalised=False)
    swapped = compute_metrics(ref, pred, spacing)
    assert swapped["LV"] == scores["LV"]
    empty = compute_metrics(pred, pred, spacing)
    assert all(s == StructureScores(1.0, 0.0, 0.0, False) for s in empty.values())
    assert hausdorff(pred == 1, ref == 1, spacing) == pytest.approx(diagonal)
    assert hausdorff(pred == 1, pred == 1, spacing) == 0.0
    assert dice_score(pred == 1, pred == 1) == 1.0
    assert dice_score(pred == 1, ref == 1) == 0.0


def test_penalty_override_and_3d_default():
    ref = np.zeros((16, 16, 4), dtype=np.uint8)
    ref[4:8, 4:8, 1:3] = 2
    pred = np.zeros_like(ref)
    scores = compute_metrics(pred, ref, (1.3, 1.3, 10.0), penalty=123.0)
    assert scores["MYO"].hd == 123.0 and scores["MYO"].hd95 == 123.0
    assert scores["MYO"].penalised
    default = compute_metrics(pred, ref, (1.3, 1.3, 10.0))["MYO"].hd
    assert default == pytest.approx(math.sqrt(2 * (16 * 1.3) ** 2 + 40.0**2))
    assert math.isfinite(default)
    for bad in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="penalty"):
            compute_metrics(pred, ref, (1.3, 1.3, 10.0), penalty=bad)


def test_voxel_units():
    rng = np.random.default_rng(7)
    pred, ref = blob_label_map((40, 40), rng), blob_label_map((40, 40), rng)
    voxels = compute_metrics(pred, ref, voxel_units=True)
    ones = compute_metrics(pred, ref, (1.0, 1.0))
    ignored = compute_metrics(pred, ref, (2.0, 3.0), voxel_units=True)
    assert voxels == ones == ignored
    empty = np.zeros_like(ref)
    assert compute_metrics(empty, ref, voxel_units=True)["LV"].hd == pytest.approx(
        math.hypot(40, 40)
    )


def test_masks_touching_the_border_match_monai():
    ref = np.zeros((32, 32), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0:10, 0:32] = 1
    pred[0:12, 3:32] = 1
    ref[20:32, 25:32] = 3
    pred[22:32, 28:32] = 3
    ref[15, 15] = 2
    pred[31, 0] = 2
    scores = compute_metrics(pred, ref, (1.25, 1.4))
    hd, hd95 = monai_hd(pred, ref, (1.25, 1.4), None), monai_hd(pred, ref, (1.25, 1.4), 95)
    for i, name in enumerate(NAMES):
        assert abs(scores[name].hd - hd[i]) <= 1e-6
        assert abs(scores[name].hd95 - hd95[i]) <= 1e-6


def test_dice_score_hand_count():
    a = np.zeros((10, 10), dtype=bool)
    b = np.zeros_like(a)
    a[0:4, 0:5] = True  # 20
    b[2:6, 0:5] = True  # 20, overlap rows 2-3: 10
    assert dice_score(a, b) == pytest.approx(2 * 10 / 40)
    assert dice_score(a.astype(np.uint8) * 7, b) == pytest.approx(0.5)


def test_fov_diagonal_mm():
    assert fov_diagonal_mm((3, 4), (1.0, 1.0)) == pytest.approx(5.0)
    assert fov_diagonal_mm((256, 256, 10), (1.4, 1.4, 10.0)) == pytest.approx(
        math.sqrt(2 * 358.4**2 + 100.0**2)
    )
    with pytest.raises(ValueError, match="spacing has 2 values"):
        fov_diagonal_mm((3, 4, 5), (1.0, 1.0))


def test_errors_are_clear():
    a = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        compute_metrics(a, np.zeros((8, 9), dtype=np.uint8), (1.0, 1.0))
    with pytest.raises(ValueError, match="one value per axis"):
        compute_metrics(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="finite and positive"):
        compute_metrics(a, a, (1.0, 0.0))
    with pytest.raises(ValueError, match="finite and positive"):
        compute_metrics(a, a, (1.0, -2.0))
    with pytest.raises(ValueError, match="required"):
        compute_metrics(a, a)
    with pytest.raises(ValueError, match="unknown structure"):
        compute_metrics(a, a, (1.0, 1.0), structures=("LA",))
    with pytest.raises(ValueError, match="2D or 3D"):
        compute_metrics(np.zeros(8), np.zeros(8), (1.0,))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff(a, a, (1.0, 1.0), percentile=0.0)
    with pytest.raises(ValueError, match="same shape"):
        dice_score(a, np.zeros((9, 8)))


def test_bench_command_lists_metrics():
    from qcloop.monitor.cli.bench import bench

    result = CliRunner().invoke(bench, ["--help"])
    assert result.exit_code == 0
    assert "metrics" in result.output
    assert "print figures" in result.output


def test_heart_phantom_is_nested():
    from qcloop.monitor.benchmarks.metrics import heart_label_map

    label = heart_label_map((128, 128), (1.4, 1.4), np.random.default_rng(0))
    assert set(np.unique(label)) == {0, 1, 2, 3}
    lv = label == 1
    # the LV blood pool is enclosed by myocardium: every LV border neighbour is LV or MYO
    ring = ndimage.binary_dilation(lv) & ~lv
    assert np.all(label[ring] == 2)


@pytest.mark.slow
def test_benchmark_values_agree_with_monai():
    from qcloop.monitor.benchmarks.metrics import run_metrics_benchmark

    figures = run_metrics_benchmark(repeats=1)
    for result in figures["results"].values():
        assert result["compared_values"] > 0
        assert result["max_abs_diff_mm"]["qcloop_vs_monai_hd"] <= 1e-6
        assert result["max_abs_diff_mm"]["qcloop_vs_monai_hd95"] <= 1e-6
        assert all(math.isfinite(v) and v > 0 for v in result["median_ms"].values())
