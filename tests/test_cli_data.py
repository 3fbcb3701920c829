"""``autoprune run --data``: bundled names, a user's factory ``module:callable``, an ImageFolder
directory with train/ and val/; the bad forms of each give one clear error (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoprune.cli.run import check_classes, load_data
from autoprune.errors import InvalidInputError

SHAPE = (1, 3, 16, 16)


def _write_images(root: Path, classes: dict[str, float], n: int, size: tuple[int, int] = (20, 24),
                  mode: str = "RGB") -> None:
    """``n`` PNGs per class under ``root/<class>/``, grey level ``classes[name]`` plus noise."""
    rng = np.random.default_rng(len(str(root)))
    for name, level in classes.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            arr = np.clip(rng.normal(level, 8.0, shape), 0, 255).astype("uint8")
            Image.fromarray(arr, mode=mode).save(d / f"img{i}.png")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _write_images(root / "train", {"cat": 30.0, "dog": 128.0, "eel": 220.0}, n=5)
    _write_images(root / "val", {"cat": 30.0, "dog": 128.0, "eel": 220.0}, n=3, mode="L")
    return root


# --- factories ----------------------------------------------------------------------------


def test_factory_loaders_are_returned_with_kwargs():
    train, val = load_data("_data_factories:loaders", SHAPE, '{"n": 20, "batch_size": 5}')
    x, y = next(iter(train))
    assert x.shape == (5, 3, 16, 16) and y.dtype == torch.long
    assert sum(len(b[1]) for b in val) == 10


@pytest.mark.parametrize("factory,kwargs,match", [
    ("_data_factories:one_loader", None,
     r"_data_factories:one_loader must return a pair \(train_loader, val_loader\), got one "
     r"DataLoader"),
    ("_data_factories:three_loaders", None, "got a tuple of length 3"),
    ("_data_factories:one_shot", None, "train loader is a one-shot iterator"),
    ("_data_factories:empty_val", None, "val loader yields no batches"),
    ("_data_factories:float_labels", None, "labels as a torch.float32 tensor"),
    ("_data_factories:no_labels", None, r"each batch must be \(inputs, targets\)"),
    ("_data_factories:loaders", '{"size": 8}',
     r"inputs of shape \(16, 3, 8, 8\), but --input-shape 1,3,16,16 asks for N,3,16,16"),
    ("_data_factories:loaders", '{"colour": 1}', "could not be called with --data-kwargs"),
    ("_data_factories:loaders", "[1]", "--data-kwargs must be a JSON object"),
    ("_data_factories:nothere", None, "module '_data_factories' has no attribute 'nothere'"),
    ("no_such_module_xyz:f", None, "cannot import module 'no_such_module_xyz' for --data"),
    ("_data_factories", None, "neither a bundled dataset .* nor a factory 'module:callable'"),
    ("_data_factories:", None, "--data must be 'module:callable'"),
])
def test_bad_factories_name_the_factory_and_the_fault(factory, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        load_data(factory, SHAPE, kwargs)


def test_bundled_names_still_load_and_refuse_data_kwargs():
    train, val = load_data("digits", (1, 1, 8, 8))
    assert next(iter(train))[0].shape[1:] == (1, 8, 8)
    assert sum(len(b[1]) for b in val) == 359  # the 20% test split
    with pytest.raises(InvalidInputError, match="not to the bundled --data digits"):
        load_data("digits", (1, 1, 8, 8), '{"batch_size": 4}')


# --- image folders ------------------------------------------------------------------------


def test_image_folder_loads_classes_shapes_and_normalisation(folder: Path):
    train, val = load_data(str(folder), SHAPE, '{"batch_size": 4}')
    assert train.dataset.classes == ["cat", "dog", "eel"] == val.dataset.classes
    xs, ys = zip(*list(train))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (15, 3, 16, 16) and xs[0].shape[0] == 4
    assert sorted(y.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    # grey levels 30 / 128 / 220 normalised with mean 0.5, std 0.5: about -0.76 / 0.0 / 0.73
    for k, want in enumerate((30.0, 128.0, 220.0)):
        assert float(x[y == k].mean()) == pytest.approx((want / 255 - 0.5) / 0.5, abs=0.03)
    # grayscale PNGs in val/ are converted to the 3 channels asked for
    vx, vy = next(iter(val))
    assert vx.shape == (9, 3, 16, 16) and vy.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_to_one_channel_with_own_statistics(folder: Path):
    opts = json.dumps({"batch_size": 2, "mean": [0.0], "std": 1.0})
    train, val = load_data(str(folder), (1, 1, 12, 20), opts)
    x, y = next(iter(val))
    assert x.shape == (9, 1, 12, 20)
    assert float(x[y == 2].mean()) == pytest.approx(220 / 255, abs=0.03)
    assert next(iter(train))[0].shape == (2, 1, 12, 20)


@pytest.mark.parametrize("change,match", [
    (lambda r: __import__("shutil").rmtree(r / "val"), r"has no val/ subfolder"),
    (lambda r: __import__("shutil").rmtree(r / "train"), r"has no train/ subfolder"),
    (lambda r: [__import__("shutil").rmtree(p) for p in (r / "val").iterdir()],
     r"val has no class subfolders \(an empty class set\)"),
    (lambda r: (r / "val" / "eel").rename(r / "val" / "emu"),
     r"classes of train/ and val/ differ \(only in train: \['eel'\]; only in val: \['emu'\]\)"),
    (lambda r: [p.unlink() for p in (r / "val" / "dog").iterdir()], r"val.*no valid file"),
])
def test_bad_image_folders_name_what_is_wrong(folder: Path, change, match):
    change(folder)
    with pytest.raises(InvalidInputError, match=match):
        load_data(str(folder), SHAPE)


@pytest.mark.parametrize("shape,kwargs,match", [
    ((1, 4, 16, 16), None, "1 \\(grayscale\\) or 3 \\(RGB\\) channels, but --input-shape asks for 4"),
    ((1, 3, 16), None, "needs --input-shape N,C,H,W, got 1,3,16"),
    (SHAPE, '{"batchsize": 4}', r"\['batchsize'\] are not options of an image folder"),
    (SHAPE, '{"batch_size": 0}', "batch_size must be an integer >= 1, got 0"),
    (SHAPE, '{"mean": [0.5, 0.5]}', "mean must be a number or a list of 3 numbers"),
    (SHAPE, '{"std": 0}', "std must be positive"),
])
def test_image_folder_options_are_checked(folder: Path, shape, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        load_data(str(folder), shape, kwargs)


def test_a_file_is_not_an_image_folder(tmp_path: Path):
    f = tmp_path / "data.txt"
    f.write_text("x")
    with pytest.raises(InvalidInputError, match="is a file"):
        load_data(str(f), SHAPE)


def test_more_classes_than_model_outputs_is_an_error(folder: Path):
    from _data_factories import tiny_cnn

    _, val = load_data(str(folder), SHAPE)
    x = torch.randn(*SHAPE)
    check_classes(tiny_cnn(num_classes=3).eval(), x, val, str(folder))
    with pytest.raises(InvalidInputError, match='3 classes but the model gives 2 outputs.*'
                       '"num_classes": 3'):
        check_classes(tiny_cnn(num_classes=2).eval(), x, val, str(folder))


# --- the command line ---------------------------------------------------------------------


def _run_args(tmp_path: Path, data: str, *extra: str) -> list[str]:
    return ["run", "--model", "_data_factories:tiny_cnn", "--input-shape", "1,3,16,16",
            "--device", "synthetic", "--budget-fraction", "0.8", "--data", data,
            "--run-dir", str(tmp_path / "run"), "--tables-root", str(tmp_path / "tables"),
            "--no-export", "--quiet", *extra]


@pytest.mark.parametrize("data,extra,match", [
    ("_data_factories:one_loader", (), "must return a pair"),
    ("nowhere/imgs", (), "neither a bundled dataset"),
    ("digits", ("--data-kwargs", '{"a": 1}'), "not to the bundled --data digits"),
])
def test_cli_reports_bad_data_without_a_traceback(capsys, tmp_path: Path, data, extra, match):
    from autoprune.cli import main

    assert main(_run_args(tmp_path, data, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoprune: error:") and match in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_passes_the_factory_loaders_to_the_pipeline(tmp_path: Path, monkeypatch):
    import autoprune.pipeline as pipeline
    from autoprune.cli import main

    seen = {}

    class Report:
        budget_met = True

    def fake_run_pipeline(model, example, **kw):
        seen.update(kw)
        return Report()

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    code = main(_run_args(tmp_path, "_data_factories:loaders", "--data-kwargs",
                          '{"n": 12, "batch_size": 4}', "--finetune-epochs", "2"))
    assert code == 0
    assert len(seen["train_loader"].dataset) == 12 and len(seen["val_loader"].dataset) == 6
    assert seen["finetune_epochs"] == 2


def test_cli_run_on_an_image_folder_reports_accuracy_on_its_val_split(tmp_path: Path):
    """A short real run (synthetic device): the dense model is pretrained on train/, and the
    reported dense accuracy is the one on val/, whose 'cat' folder holds dog-like images (so
    val accuracy is about 2/3 while train accuracy is 1)."""
    from _data_factories import tiny_cnn

    from autoprune._finetune import evaluate_accuracy
    from autoprune.cli import main
    from autoprune.io import safe_torch_load

    root = tmp_path / "imgs"
    _write_images(root / "train", {"cat": 20.0, "dog": 128.0, "eel": 235.0}, n=8)
    _write_images(root / "val", {"cat": 128.0, "dog": 128.0, "eel": 235.0}, n=4)
    code = main(_run_args(tmp_path, str(root), "--data-kwargs", '{"batch_size": 8}',
                          "--n-trials", "3", "--predictor-samples", "16",
                          "--pretrain-epochs", "3", "--finetune-epochs", "1"))
    assert code == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    dense = tiny_cnn()
    dense.load_state_dict(safe_torch_load(tmp_path / "run" / "dense.pt"))
    train, val = load_data(str(root), SHAPE, '{"batch_size": 8}')
    acc_train = evaluate_accuracy(dense, train)
    acc_val = evaluate_accuracy(dense, val)
    assert acc_train == 1.0 and acc_val < 0.9
    assert report["accuracy_dense"] == pytest.approx(acc_val)
    assert report["accuracy_pruned"] is not None
