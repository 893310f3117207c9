"""Train a segmentation model that qcloop did not train, export it to ONNX and describe it with
a model card: the "your model" of docs/your-model.md.

The model is MONAI's 2D ``UNet`` trained with a plain PyTorch loop (MONAI's Dice + CE loss, Adam,
CPU, seeded) on the labelled training cases of one vendor. On purpose it differs from qcloop's
own segmenters in everything a card describes:

* label order: model class 0 background, 1 RV, 2 MYO, 3 LV (qcloop: 1 LV, 2 MYO, 3 RV);
* normalisation: intensities clipped to the volume's 1st-99th percentiles, mapped to 0-1
  (qcloop's demo: z-score);
* grid: 1.5 mm in-plane, 160 x 160 slices (qcloop's demo: 1.8 mm, 128 x 128).

The preparation is qcloop's :class:`~qcloop.monitor.data.Preprocessor` with exactly the
settings the card declares, so the card's ``input`` describes what the model was trained on.
Writes ``OUT/model.onnx``, ``OUT/card.yaml`` and ``OUT/training.json`` (losses, validation
Dice, ONNX parity, timings)::

    python examples/external-model/make_model.py --data qcloop-demo/data --out /tmp/ext/model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qcloop.monitor.data import Preprocessor, discover, load_cases

#: qcloop label (0 bg, 1 LV, 2 MYO, 3 RV) -> this model's class (0 bg, 1 RV, 2 MYO, 3 LV).
TO_MODEL = np.array([0, 3, 2, 1], dtype=np.uint8)
MODEL_LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
PERCENTILES = (1.0, 99.0)
#: Total stride of the U-Net (three stride-2 levels): input sides must be multiples of it.
DIVISOR = 8


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="labelled dataset (M&Ms-2 layout)")
    p.add_argument("--out", required=True, type=Path, help="folder for model.onnx and card.yaml")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=160, help="input side in pixels")
    p.add_argument("--spacing", type=float, default=1.5, help="in-plane spacing in mm")
    p.add_argument("--views", default="SA,LA", help="views to train on and declare")
    p.add_argument("--vendor", default="A", help="train on this vendor's cases")
    p.add_argument("--slices-per-epoch", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--channels", default="8,16,32,64", help="U-Net channels per level")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.size % DIVISOR:
        p.error(f"--size must be a multiple of {DIVISOR}")
    return args


def load_split(
    data: Path, split: str, vendor: str, views: Sequence[str], pre: Preprocessor
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Prepared slices ``(N, S, S)`` and labels in the model's order of one split's labelled
    cases, and each slice's view."""
    sources = discover(data, views=views, where={"SPLIT": split, "VENDOR": vendor})
    report = load_cases([s for s in sources if s.gt_path is not None])
    if not report.cases:
        raise SystemExit(f"{data}: no labelled {split} case of vendor {vendor} in {views}")
    images, labels, slice_views = [], [], []
    for case in report.cases:
        prepared = pre.prepare(case)
        images.append(prepared.image)
        labels.append(TO_MODEL[prepared.gt])
        slice_views += [case.view] * prepared.image.shape[0]
    return np.concatenate(images), np.concatenate(labels), slice_views


def build_net(channels: Sequence[int]) -> torch.nn.Module:
    """MONAI's 2D U-Net, 1 input channel, 4 classes."""
    from monai.networks.nets import UNet

    return UNet(**net_params(channels))


def net_params(channels: Sequence[int]) -> dict[str, Any]:
    """The U-Net's constructor arguments."""
    channels = list(channels)
    return {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 4,
        "channels": channels,
        "strides": [2] * (len(channels) - 1),
        "num_res_units": 1,
    }


def epoch_order(views: list[str], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` slice indices for one epoch, each view drawn equally often (LA has one slice
    per case, SA about a dozen)."""
    groups = [np.flatnonzero(np.asarray(views) == v) for v in sorted(set(views))]
    per_view = -(-count // len(groups))
    picks = [rng.choice(g, per_view, replace=len(g) < per_view) for g in groups]
    return rng.permutation(np.concatenate(picks))[:count]


@torch.inference_mode()
def validation_dice(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> list[float]:
    """Dice of model classes 1..3 over all validation slices (on the network grid)."""
    net.eval()
    pred = np.concatenate(
        [
            net(torch.from_numpy(images[i : i + 16, None])).argmax(1).numpy()
            for i in range(0, len(images), 16)
        ]
    )
    out = []
    for c in (1, 2, 3):
        p, g = pred == c, labels == c
        denom = p.sum() + g.sum()
        out.append(float(2 * (p & g).sum() / denom) if denom else 1.0)
    return out


def train(
    args: argparse.Namespace,
    train_set: tuple[np.ndarray, np.ndarray, list[str]],
    val_set: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Train the U-Net; returns the best state (by mean validation Dice) and the history."""
    from monai.losses import DiceCELoss

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, labels, views = train_set
    net = build_net([int(c) for c in args.channels.split(",")])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"dice": -1.0}
    for epoch in range(args.epochs):
        t0, losses = time.perf_counter(), []
        net.train()
        order = epoch_order(views, args.slices_per_epoch, rng)
        for start in range(0, len(order), args.batch_size):
            idx = np.sort(order[start : start + args.batch_size])
            x = torch.from_numpy(images[idx, None])
            y = torch.from_numpy(labels[idx, None].astype(np.int64))
            flip = rng.random(2) < 0.5  # the only augmentation: flips along each axis
            dims = [d for d, f in zip((2, 3), flip, strict=True) if f]
            if dims:
                x, y = x.flip(dims), y.flip(dims)
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        dice = validation_dice(net, *val_set)
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice_rv_myo_lv": dice}
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        print(json.dumps(row), flush=True)
        if np.mean(dice) > best["dice"]:
            best = {"dice": float(np.mean(dice)), "epoch": epoch + 1, "state": net.state_dict()}
            best["state"] = {k: v.clone() for k, v in best["state"].items()}
    net.load_state_dict(best["state"])
    return {"net": net.eval(), "history": history, "best_epoch": best["epoch"]}


def export_onnx(net: torch.nn.Module, path: Path, size: int) -> None:
    """The network as ONNX with batch, height and width dynamic (legacy exporter, opset 17)."""
    axes = {0: "n", 2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter
        torch.onnx.export(
            net,
            (torch.zeros(2, 1, size, size),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=17,
            dynamo=False,
        )


def onnx_parity(net: torch.nn.Module, path: Path, images: np.ndarray) -> dict[str, float]:
    """ONNX Runtime against PyTorch on a few slices (batch 3, to exercise the dynamic batch)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.ascontiguousarray(images[:3, None])
    got = session.run(None, {"image": batch})[0]
    with torch.inference_mode():
        want = net(torch.from_numpy(batch)).numpy()
    return {
        "max_abs_diff": float(np.abs(got - want).max()),
        "argmax_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
    }


def write_card(out: Path, args: argparse.Namespace, views: Sequence[str]) -> Path:
    """``card.yaml``: what qcloop needs to run the ONNX model as it was trained."""
    card = {
        "kind": "onnx",
        "path": "model.onnx",
        "views": list(views),
        "input": {
            "spacing_mm": args.spacing,
            "size": args.size,
            "divisor": DIVISOR,
            "normalise": "percentile",
            "percentiles": list(PERCENTILES),
        },
        "output": {"activation": "softmax", "labels": MODEL_LABELS},
    }
    path = out / "card.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Train, export, write the card, and check that qcloop loads it."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    views = [v.strip().upper() for v in args.views.split(",") if v.strip()]
    t0 = time.perf_counter()
    pre = Preprocessor(
        args.size,
        target_spacing=args.spacing,
        divisor=DIVISOR,
        normalisation="percentile",
        percentiles=PERCENTILES,
    )
    train_set = load_split(args.data, "train", args.vendor, views, pre)
    val_set = load_split(args.data, "val", args.vendor, views, pre)[:2]
    print(f"{len(train_set[0])} training and {len(val_set[0])} validation slices", flush=True)
    t_load = time.perf_counter() - t0
    result = train(args, train_set, val_set)
    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(result["net"], args.out / "model.onnx", args.size)
    parity = onnx_parity(result["net"], args.out / "model.onnx", val_set[0])
    card = write_card(args.out, args, views)

    from qcloop.monitor.method.external import load_card_model

    load_card_model(card).check()  # the card and the model agree: the dry run qcloop does
    info = {
        "command": " ".join(["python", *sys.argv]) if argv is None else None,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": "monai.networks.nets.UNet",
        "params": net_params([int(c) for c in args.channels.split(",")]),
        "train_slices": len(train_set[0]),
        "val_slices": len(val_set[0]),
        "best_epoch": result["best_epoch"],
        "history": result["history"],
        "onnx_parity": parity,
        "seconds": {"load": t_load, "total": time.perf_counter() - t0},
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out / 'model.onnx'} and {card} in {info['seconds']['total']:.0f} s")
    print(f"ONNX parity: {parity}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
