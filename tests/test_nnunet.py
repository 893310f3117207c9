"""The ``nnunet`` model kind: a trained nnU-Net v2 model folder run through nnU-Net's own
predictor from a model card.

Fast tests check the card (params, input/output fields, the folder, folds, checkpoint, label
map) on a fake model folder, and that the plugin does not import ``nnunetv2``. The slow tests
train a real, tiny 2d nnU-Net on the ``tiny`` phantom cohort (nnU-Net's own planning,
preprocessing and trainer, on the CPU, in a child process: about a minute on two shared
cores) and run it through ``load_card_model``: nnU-Net's axis order, probabilities on the
case's grid, the label map, fold ensembles, and the dry run. They need the ``nnunet`` extra
(``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qcloop.monitor.core.model_card import ModelCardError, load_card
from qcloop.monitor.core.optional import MissingExtraError
from qcloop.monitor.data import Case, discover, load_case
from qcloop.monitor.method.external import CardPredictor, load_card_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
DATASET = "Dataset999_Phantom"
MODEL_DIR = f"results/{DATASET}/nnUNetTrainer__nnUNetPlans__2d"
#: The nnU-Net dataset's label order (ACDC's): RV and LV swapped against qcloop's
#: (0 bg, 1 LV, 2 MYO, 3 RV).
NNUNET_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
CARD_LABELS = "{0: background, 1: RV, 2: MYO, 3: LV}"
#: qcloop label -> the model's class (and back: the permutation is its own inverse).
QCLOOP_TO_MODEL = [0, 3, 2, 1]


def write_card(folder: Path, path: str, *, extra: str = "", **fields: str) -> Path:
    """A ``kind: nnunet`` card in ``folder`` for the model folder ``path`` (relative to it)."""
    values = {
        "input": "{normalise: none}",
        "output": f"{{activation: none, labels: {CARD_LABELS}}}",
        **fields,
    }
    lines = ["kind: nnunet", f"path: {path}", "views: [SA]", extra]
    lines += [f"{name}: {value}" for name, value in values.items()]
    card = folder / "card.yaml"
    card.write_text("\n".join(line for line in lines if line) + "\n")
    return card


def fake_model(folder: Path, *, labels: dict[str, Any] | None = None, folds: tuple = (0,)) -> Path:
    """A model folder with the files nnU-Net writes (their content is not a real model)."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = {
        "channel_names": {"0": "MRI"},
        "labels": NNUNET_LABELS if labels is None else labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    plans = {"configurations": {"2d": {}}, "image_reader_writer": "SimpleITKIO"}
    (folder / "plans.json").write_text(json.dumps(plans))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    return folder


def card_error(card: Path) -> ModelCardError:
    """The error loading ``card``'s model raises."""
    with pytest.raises(ModelCardError) as info:
        load_card_model(card)
    return info.value


# --------------------------------------------------------------------------- the card


def test_the_plugin_registers_nnunet_without_importing_it() -> None:
    code = textwrap.dedent(
        """
        import sys
        from qcloop.monitor.core.plugin_manager import make_plugin_manager
        kinds = make_plugin_manager(load_entrypoints=False).model_kinds()
        assert kinds.plugin_of("nnunet") == "qcloop.segmenters.nnunet", kinds.names()
        assert "nnunetv2" not in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_params_are_for_torch_and_nnunet_only(tmp_path: Path) -> None:
    fake_model(tmp_path / "model")
    card = load_card(write_card(tmp_path, "model", params="{folds: 0, use_mirroring: false}"))
    assert card.module_params == {"folds": 0, "use_mirroring": False}
    onnx = tmp_path / "onnx.yaml"
    (tmp_path / "m.onnx").write_bytes(b"")
    onnx.write_text(
        f"kind: onnx\npath: m.onnx\nviews: [SA]\nparams: {{a: 1}}\n"
        f"output: {{labels: {CARD_LABELS}}}\n"
    )
    with pytest.raises(ModelCardError) as info:
        load_card(onnx)
    assert info.value.field == "params" and "not 'onnx'" in str(info.value)


@pytest.mark.parametrize(
    ("params", "field", "problem"),
    [
        ("{folds: [-1]}", "params.folds", "greater than or equal to 0"),
        ("{folds: []}", "params.folds", "at least 1"),
        ("{checkpoint: ../model.pth}", "params.checkpoint", "a file name inside each fold"),
        ("{tile_step_size: 0}", "params.tile_step_size", "greater than 0"),
        ("{use_mirroring: maybe}", "params.use_mirroring", "valid boolean"),
        ("{fold: 0}", "params.fold", "unknown parameter"),
    ],
    ids=["negative-fold", "no-fold", "checkpoint-path", "step", "mirroring", "unknown"],
)
def test_bad_params_name_the_parameter(
    tmp_path: Path, params: str, field: str, problem: str
) -> None:
    fake_model(tmp_path / "model")
    error = card_error(write_card(tmp_path, "model", params=params))
    assert error.field == field and problem in str(error), str(error)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"input": "{normalise: zscore}"}, "input.normalise"),
        ({"input": "{normalise: none, spacing_mm: 1.5}"}, "input.spacing_mm"),
        ({"input": "{normalise: none, size: 128}"}, "input.size"),
        ({"output": f"{{activation: softmax, labels: {CARD_LABELS}}}"}, "output.activation"),
    ],
    ids=["normalise", "spacing", "size", "activation"],
)
def test_nnunet_prepares_its_own_input(tmp_path: Path, fields: dict[str, str], field: str) -> None:
    fake_model(tmp_path / "model")
    error = card_error(write_card(tmp_path, "model", **fields))
    assert error.field == field and "nnU-Net" in str(error)


def test_folder_errors_name_path(tmp_path: Path) -> None:
    error = card_error(write_card(tmp_path, "missing"))
    assert error.field == "path" and "does not exist" in str(error)
    (tmp_path / "file").write_text("")
    assert "is not a folder" in str(card_error(write_card(tmp_path, "file")))
    (fake_model(tmp_path / "model") / "plans.json").unlink()
    error = card_error(write_card(tmp_path, "model"))
    assert error.field == "path" and "no plans.json" in str(error)
    fake_model(tmp_path / "empty", folds=())
    error = card_error(write_card(tmp_path, "empty"))
    assert error.field == "path" and "no fold_N/checkpoint_final.pth" in str(error)
    assert str(error).startswith(f"{tmp_path / 'card.yaml'}: path: ")


def test_bad_fold_and_checkpoint_name_their_params(tmp_path: Path) -> None:
    fake_model(tmp_path / "model", folds=(0, 1))
    error = card_error(write_card(tmp_path, "model", params="{folds: [0, 3]}"))
    assert error.field == "params.folds"
    assert "fold_3 does not exist (found: fold_0, fold_1)" in str(error)
    error = card_error(write_card(tmp_path, "model", params="{checkpoint: checkpoint_best.pth}"))
    assert error.field == "params.checkpoint"
    assert "no fold holds checkpoint_best.pth (fold_0, fold_1)" in str(error)
    error = card_error(write_card(tmp_path, "model", params="{folds: 1, checkpoint: best.pth}"))
    assert error.field == "params.checkpoint" and "fold_1 has no best.pth" in str(error)


@pytest.mark.parametrize(
    ("labels", "field", "problem"),
    [
        ({"background": 0, "LV": 1, "MYO": 2, "RV": 3}, "output.labels", "class 1 is 'LV'"),
        ({"background": 0, "RV": 1, "LV": 2}, "output.labels", "the model has 3 classes"),
        ({"background": 0, "RV": 1, "MYO": 2, "LV": [1, 2]}, "path", "region-based"),
        ({"background": 0, "RV": 1, "MYO": 2, "LV": 4}, "path", "not 0..N-1"),
    ],
    ids=["swapped", "count", "regions", "gap"],
)
def test_the_model_labels_must_match_the_card(
    tmp_path: Path, labels: dict[str, Any], field: str, problem: str
) -> None:
    fake_model(tmp_path / "model", labels=labels)
    error = card_error(write_card(tmp_path, "model"))
    assert error.field == field and problem in str(error), str(error)


def test_a_missing_nnunetv2_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_model(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'qcloop\[nnunet\]'"):
        load_card_model(write_card(tmp_path, "model"))


def test_checkpoints_load_as_weights_only(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2", reason="the nnunet extra is not installed")
    import torch

    folder = fake_model(tmp_path / "model")
    card = write_card(tmp_path, "model")
    error = card_error(card)
    assert error.field == "params.checkpoint" and "not loadable as weights only" in str(error)
    # a pickle that would run code when loaded (weights_only=False) is refused
    checkpoint = {"network_weights": {}, "payload": shutil.rmtree}
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    error = card_error(card)
    assert error.field == "params.checkpoint" and "rmtree" in str(error)
    torch.save({"weights": {}}, folder / "fold_0" / "checkpoint_final.pth")
    assert "not an nnU-Net checkpoint" in str(card_error(card))


# --------------------------------------------------------------------------- a trained model


def train_tiny_nnunet(cohort: Path, root: Path) -> Path:
    """Convert the cohort's train/val short-axis cases to an nnU-Net raw dataset (labels in
    :data:`NNUNET_LABELS` order), plan and preprocess it (2d), shrink the planned network and
    train fold 0 for a few iterations on the CPU; returns the trained model folder. Runs in a
    child process (nnU-Net reads its folders from the environment and spawns workers)."""
    import nibabel as nib
    import torch

    raw = Path(os.environ["nnUNet_raw"]) / DATASET  # noqa: SIM112 (nnU-Net's names)
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    to_model = np.array(QCLOOP_TO_MODEL, dtype=np.uint8)
    sources = [s for s in discover(cohort, views=["SA"]) if s.metadata["split"] != "test"]
    for source in sources:
        case = load_case(source)
        name = f"{source.subject}_{source.phase}"
        shutil.copy(source.image_path, raw / "imagesTr" / f"{name}_0000.nii.gz")
        image = nib.load(source.image_path)
        labels = nib.Nifti1Image(to_model[case.gt], image.affine, image.header)
        labels.set_data_dtype(np.uint8)
        nib.save(labels, raw / "labelsTr" / f"{name}.nii.gz")
    dataset = {"channel_names": {"0": "MRI"}, "labels": NNUNET_LABELS, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps({**dataset, "numTraining": len(sources)}))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    # nnUNetv2_plan_and_preprocess -d 999 -c 2d -np 1 --verify_dataset_integrity
    extract_fingerprints([999], num_processes=1, check_dataset_integrity=True)
    plans_name = plan_experiments([999])
    preprocessed = Path(os.environ["nnUNet_preprocessed"])  # noqa: SIM112
    plans_file = preprocessed / DATASET / f"{plans_name}.json"
    plans = json.loads(plans_file.read_text())
    # a narrower network than planned: same architecture class, ten times faster on a CPU
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [
        8,
        16,
        32,
        64,
        64,
    ]
    plans_file.write_text(json.dumps(plans, indent=1))
    preprocess([999], plans_name, configurations=("2d",), num_processes=(1,))

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112 (augmentation in this process)
    dataset_json = json.loads((plans_file.parent / "dataset.json").read_text())
    plans = {**json.loads(plans_file.read_text()), "continue_training": False}
    trainer = nnUNetTrainer(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = 2
    trainer.num_iterations_per_epoch = 8
    trainer.num_val_iterations_per_epoch = 2
    trainer.logger.plot_progress_png = lambda *args, **kwargs: None  # matplotlib, per epoch
    trainer.run_training()
    return Path(trainer.output_folder_base)


@pytest.fixture(scope="session")
def nnunet_root(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nnU-Net's raw, preprocessed and results folders, a tiny 2d model trained once per
    session (:func:`train_tiny_nnunet`, in a child process) in ``results/``."""
    pytest.importorskip("nnunetv2", reason="the nnunet extra is not installed")
    root = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}
    for name in ("raw", "preprocessed", "results"):
        (root / name).mkdir()
        env[f"nnUNet_{name}"] = str(root / name)
    code = (
        "import sys; from pathlib import Path; from tests.test_nnunet import train_tiny_nnunet; "
        "print(train_tiny_nnunet(Path(sys.argv[1]), Path(sys.argv[2])))"
    )
    command = [sys.executable, "-c", code, str(tiny_cohort), str(root)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert (root / MODEL_DIR / "fold_0" / "checkpoint_final.pth").is_file()
    return root


def sa_case(cohort: Path, subject: str) -> Case:
    """The ED short-axis case of ``subject``."""
    sources = discover(cohort, views=["SA"], phases=["ED"])
    return load_case(next(s for s in sources if s.subject == subject))


def nnunet_reads(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The image as nnU-Net's own reader (SimpleITK) gives it: ``(1, z, y, x)`` and spacing."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, properties = SimpleITKIO().read_images([str(path)])
    return image, {"spacing": properties["spacing"]}


@pytest.mark.slow
def test_the_card_runs_the_model_as_nnunet_does(nnunet_root: Path, tiny_cohort: Path) -> None:
    from qcloop.segmenters.nnunet import NnunetCardModel

    card = write_card(nnunet_root, MODEL_DIR, params="{folds: [0], use_mirroring: false}")
    predictor = load_card_model(card, batch_size=16)
    model = predictor.model
    assert isinstance(predictor, CardPredictor) and isinstance(model, NnunetCardModel)
    assert not predictor.trainable and model.module is None
    assert model.folds == (0,) and model.configuration == "2d"
    assert model.providers() == (["cuda:0"] if _cuda() else ["cpu"])

    case = sa_case(tiny_cohort, "007")  # a test case, unseen in training
    probs = model.predict_case(case.image, case.spacing)
    assert probs.shape == (*case.image.shape, 4) and probs.dtype == np.float32
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    # nnU-Net's whole path on the file it reads itself: same axes, same spacing, same numbers
    image, properties = nnunet_reads(case.source.image_path)
    _, reference = model.predictor.predict_single_npy_array(image, properties, None, None, True)
    np.testing.assert_allclose(probs, np.asarray(reference).transpose(3, 2, 1, 0), atol=1e-5)

    # qcloop's label order: LV (1) is the model's class 3, RV (3) its class 1
    out = predictor.original_probabilities(case)
    assert out.shape == (*case.image.shape, 4) and np.all(np.isfinite(out))
    via_case = probs[..., QCLOOP_TO_MODEL]
    # CardPredictor takes nnU-Net's whole-case path (its own resampling), not slices
    assert np.allclose(out, via_case, atol=1e-5)
    assert not np.allclose(out, out[..., [0, 3, 2, 1]], atol=1e-3)  # LV and RV differ

    predictor.check()  # the dry run on synthetic slices
    predictor.check(case)


@pytest.mark.slow
def test_folds_found_and_ensembled(nnunet_root: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(nnunet_root / MODEL_DIR, folder)
    shutil.copytree(folder / "fold_0", folder / "fold_1")
    predictor = load_card_model(write_card(tmp_path, "model", params="{use_mirroring: false}"))
    assert predictor.model.folds == (0, 1)
    case = sa_case(tiny_cohort, "011")  # vendor B
    both = predictor.model.predict_case(case.image, case.spacing)
    single = load_card_model(
        write_card(tmp_path, "model", params="{folds: 1, use_mirroring: false}")
    )
    np.testing.assert_allclose(both, single.model.predict_case(case.image, case.spacing), atol=1e-5)
    # the model's first checkpoint is loaded, its mirroring axes with it
    mirrored = load_card_model(write_card(tmp_path, "model", params="{folds: [0]}"))
    assert mirrored.model.predictor.allowed_mirroring_axes == (0, 1)
    assert np.all(np.isfinite(mirrored.model.predict_case(case.image, case.spacing)))


@pytest.mark.slow
def test_the_checkpoint_names_its_trainer(nnunet_root: Path, tmp_path: Path) -> None:
    import torch

    folder = tmp_path / "model"
    shutil.copytree(nnunet_root / MODEL_DIR, folder)
    checkpoint_file = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, weights_only=False)  # written by this session
    card = write_card(tmp_path, "model", params="{use_mirroring: false}")
    # a variant trainer nnU-Net ships (same network), found even where an unrelated trainer's
    # module cannot be imported (timm needs a torchvision built for the installed torch)
    torch.save({**checkpoint, "trainer_name": "nnUNetTrainer_5epochs"}, checkpoint_file)
    assert load_card_model(card).model.predictor.trainer_name == "nnUNetTrainer_5epochs"
    torch.save({**checkpoint, "trainer_name": "MyTrainer"}, checkpoint_file)
    error = card_error(card)
    assert error.field == "path" and "'MyTrainer' is not one of nnU-Net's" in str(error)
    assert "nnUNet_extTrainer" in str(error)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
