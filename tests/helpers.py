"""Small synthetic data for tests: heart-like label slices and matching images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qcloop.monitor.core.config import QcloopConfig, load_config


def heart_slices(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` slices: images ``(n, size, size)`` float32 and labels ``(n, size, size)`` uint8
    (LV disc, MYO ring, RV crescent beside it), with random position, size and contrast noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cx, cy = size / 2 + rng.uniform(-4, 4, 2)
        r = size * rng.uniform(0.11, 0.15)
        wall = size * rng.uniform(0.04, 0.06)
        d = np.hypot(xx - cx, yy - cy)
        lab = np.zeros((size, size), np.uint8)
        rv_d = np.hypot(xx - (cx - 1.3 * (r + wall)), (yy - cy) * 0.8)
        lab[(rv_d < r * 1.2) & (d > r + wall)] = 3
        lab[d < r + wall] = 2
        lab[d < r] = 1
        labels[i] = lab
        img = np.choose(lab, [0.1, 1.0, 0.3, 0.9]).astype(np.float32)
        images[i] = img + rng.normal(0, 0.05, img.shape).astype(np.float32)
    images = (images - images.mean()) / images.std()
    return images, labels


def tiny_run_config() -> QcloopConfig:
    """A model set small enough to train in seconds: for tests of what consumes a run (export,
    serving, monitoring, tracking), not of segmentation quality."""
    return QcloopConfig.model_validate(
        {
            "seed": 0,
            "preprocessing": {"size": 64, "target_spacing_mm": 4.0},
            "segmenter": {"name": "bn2", "params": {"base_width": 8, "depth": 4}},
            "training": {
                "epochs": 4,
                "batch_size": 8,
                "m_best": 2,
                "max_slices_per_epoch": 64,
                "min_steps": 300,
            },
            "qc": {
                "module": {
                    "name": "autoencoder",
                    "params": {
                        "width_scale": 0.25,
                        "latent_channels": 32,
                        "dropout": 0.1,
                        "lr": 2e-3,
                    },
                },
                "epochs": 30,
                "batch_size": 8,
                "min_steps": 150,
            },
            "refinement": {
                "refiner": {"name": "alpha", "params": {"k_semi": 1, "max_slices_per_epoch": 16}},
            },
        }
    )


def torch_card(
    tiny_run: Path,
    folder: Path,
    *,
    module: str | None = None,
    labels: str | None = None,
    input_: dict[str, Any] | None = None,
) -> Path:
    """A ``torch`` model card of a run's best SA candidate, as its own authors would write it
    (``module``: another class by import path; ``labels``: its label order as YAML; ``input_``:
    fields replacing the run's own preparation)."""
    cfg = load_config(tiny_run / "config.yaml")
    folder.mkdir(parents=True, exist_ok=True)
    entry = json.loads((tiny_run / "SA" / "candidates.json").read_text())[0]
    state = torch.load(tiny_run / "SA" / entry["path"], weights_only=True)["state_dict"]
    torch.save(state, folder / "weights.pt")
    spec = {
        "spacing_mm": cfg.preprocessing.target_spacing_mm,
        "size": cfg.preprocessing.size,
        "divisor": 16,
        "normalise": cfg.preprocessing.normalisation,
    }
    card = {
        "kind": "torch",
        "path": "weights.pt",
        "module": module or "qcloop.segmenters.bn2.BN2UNet",
        "params": dict(cfg.segmenter.params),
        "views": ["SA"],
        "input": {**spec, **(input_ or {})},
        "output": {
            "activation": "softmax",
            "labels": yaml.safe_load(labels or "{0: background, 1: LV, 2: MYO, 3: RV}"),
        },
    }
    path = folder / "card.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def qc_record(pdc: float, true: float | None, *, vendor: str = "A", entropy: float = 0.2) -> dict:
    """A judged record of one candidate whose every structure has ``pdc`` (and ``true``)."""
    cand = {s: {"pdc": pdc, "phd_mm": 40 * (1 - pdc), "phd95_mm": 0.0, "penalised": False}
            for s in ("LV", "MYO", "RV")}  # fmt: skip
    rec: dict[str, Any] = {
        "view": "SA", "vendor": vendor, "candidates": [cand],
        "selection": {"kind": "candidate", "index": 0, "indices": None},
        "signals": {"entropy": [{s: entropy for s in cand}], "agreement": {s: 1.0 for s in cand}},
    }  # fmt: skip
    if true is not None:
        rec["true_selected"] = {s: {"dice": true, "hd_mm": 50 * (1 - true)} for s in cand}
    return rec


def biased_records(n: int, seed: int) -> list[dict]:
    """pDC that runs 0.1 below true Dice, with noise: what the calibrator should correct."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.4, 0.98, n)
    pdc = np.clip(true - 0.1 + rng.normal(0, 0.03, n), 0, 1)
    return [qc_record(float(p), float(t)) for p, t in zip(pdc, true, strict=True)]
