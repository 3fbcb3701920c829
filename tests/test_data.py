"""The glyphs task (``autoprune.data.glyphs_tensors`` / ``glyphs_loaders``): determinism,
shapes, the difficulty knob, the on-disk cache and its corruption, bad arguments."""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune import data
from autoprune.errors import CorruptFileError, InvalidInputError

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(size=32, n_classes=50, n_train=100, n_test=50)


def _digest(train, test) -> str:
    h = hashlib.sha256()
    for ds in (train, test):
        for t in ds.tensors:
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_defaults_are_a_hard_task_of_50_classes_at_64px():
    for fn in (data.glyphs_tensors, data.glyphs_loaders):
        params = inspect.signature(fn).parameters
        assert params["size"].default >= 64
        assert params["n_classes"].default >= 50
    assert len(data.GLYPH_CLASSES) >= 50
    assert len(set(data.GLYPH_CLASSES)) == len(data.GLYPH_CLASSES)


def test_same_seed_is_bit_identical_and_another_seed_differs():
    a = data.glyphs_tensors(**SMALL, seed=0, root=False)
    b = data.glyphs_tensors(**SMALL, seed=0, root=False)
    c = data.glyphs_tensors(**SMALL, seed=1, root=False)
    for x, y in zip(a, b):
        assert torch.equal(x.tensors[0], y.tensors[0]) and torch.equal(x.tensors[1], y.tensors[1])
    assert not torch.equal(a[0].tensors[0], c[0].tensors[0])
    assert not torch.equal(a[0].tensors[1], c[0].tensors[1])
    # train and test are different draws
    assert not torch.equal(a[0].tensors[0][:50], a[1].tensors[0])


def test_same_seed_is_bit_identical_in_another_process_with_other_threads():
    here = _digest(*data.glyphs_tensors(**SMALL, seed=3, root=False))
    code = ("import hashlib, torch; torch.set_num_threads(2); from autoprune import data\n"
            f"tr, te = data.glyphs_tensors(**{SMALL!r}, seed=3, root=False)\n"
            "h = hashlib.sha256()\n"
            "for ds in (tr, te):\n"
            "    for t in ds.tensors: h.update(t.numpy().tobytes())\n"
            "print(h.hexdigest())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == here


def test_shapes_dtypes_labels_and_every_class_present():
    train, test = data.glyphs_tensors(**SMALL, seed=0, root=False)
    for ds, n in ((train, 100), (test, 50)):
        x, y = ds.tensors
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        assert float(x.std()) > 0.1  # not a blank image set
        assert int(y.min()) >= 0 and int(y.max()) < 50
    # balanced: every class equally often (up to one), shuffled (not sorted)
    counts = torch.bincount(train.tensors[1], minlength=50)
    assert int(counts.min()) == 2 and int(counts.max()) == 2
    assert not torch.equal(train.tensors[1], torch.sort(train.tensors[1]).values)
    assert set(test.tensors[1].tolist()) == set(range(50))
    grey, _ = data.glyphs_tensors(**SMALL, channels=1, seed=0, root=False)
    assert grey.tensors[0].shape == (100, 1, 32, 32)
    assert torch.equal(grey.tensors[1], train.tensors[1])


def test_every_class_is_drawn_in_several_fonts_with_ink():
    templates, covered = data._render_templates(32, len(data.GLYPH_CLASSES))
    assert covered.shape == (len(data.GLYPH_CLASSES), len(data.GLYPH_FONTS))
    assert covered.sum(1).min() >= 8, [data.GLYPH_CLASSES[i] for i in np.flatnonzero(
        covered.sum(1) < 8)]
    ink = templates.reshape(covered.shape + (-1,)).sum(-1).numpy()
    assert (ink[covered] > 5.0).all()  # no empty glyph where a font claims the character
    # different characters look different in the same font
    t = templates.reshape(covered.shape + (32, 32))[:, 0]
    assert not torch.allclose(t[0], t[1])


def test_difficulty_scales_the_distortions():
    easy, _ = data.glyphs_tensors(**SMALL, difficulty=0.0, seed=0, root=False)
    hard, _ = data.glyphs_tensors(**SMALL, difficulty=1.0, seed=0, root=False)
    named, _ = data.glyphs_tensors(**SMALL, difficulty="extreme", seed=0, root=False)
    assert torch.equal(hard.tensors[0], named.tensors[0])
    # at 0 the background is flat (no noise, clutter, gradient): the corners are one colour
    def corner_std(x: torch.Tensor) -> float:
        return float(x[:, :, :4, :4].flatten(2).std(-1).mean())
    assert corner_std(easy.tensors[0]) < 1e-3
    assert corner_std(hard.tensors[0]) > 0.02
    # at 0 every glyph is centred: its ink (deviation from the corner colour) sits mid-image
    dev = (easy.tensors[0] - easy.tensors[0][:, :, :1, :1]).abs().sum(1)
    assert float(dev[:, :3].sum() + dev[:, -3:].sum()) < 1e-3 * float(dev.sum())


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    calls = []
    real = data.generate_glyphs

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "generate_glyphs", spy)
    first = data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)
    files = sorted(tmp_path.glob("glyphs-*.pt"))
    assert len(calls) == 1 and len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)
    assert len(calls) == 1  # read back, not generated again
    assert files[0].stat().st_mtime_ns == mtime
    assert _digest(*first) == _digest(*second)
    # the cached file holds what an uncached call generates
    assert _digest(*data.glyphs_tensors(**SMALL, seed=0, root=False)) == _digest(*first)
    # channels is a view of the same cached file; any generation parameter is a new one
    data.glyphs_tensors(**SMALL, channels=1, seed=0, root=tmp_path)
    assert len(calls) == 2 and len(sorted(tmp_path.glob("glyphs-*.pt"))) == 1
    data.glyphs_tensors(**{**SMALL, "n_test": 51}, seed=0, root=tmp_path)
    data.glyphs_tensors(**SMALL, difficulty=0.3, seed=0, root=tmp_path)
    assert len(calls) == 4 and len(sorted(tmp_path.glob("glyphs-*.pt"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_default_root_is_the_autoprune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "c"))
    data.glyphs_tensors(size=16, n_classes=2, n_train=4, n_test=2)
    assert len(list((tmp_path / "c" / "glyphs").glob("glyphs-*.pt"))) == 1


def test_corrupt_cache_raises_naming_the_file(tmp_path):
    data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)
    (path,) = tmp_path.glob("glyphs-*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.raises(CorruptFileError, match=str(path).replace(".", r"\.")) as e:
        data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)
    assert "delete it" in str(e.value)
    # a readable file with other contents is refused too
    torch.save({"meta": "{}", "x_train": torch.zeros(1)}, path)
    with pytest.raises(CorruptFileError, match="other parameters"):
        data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)
    path.unlink()
    data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)  # deleting it regenerates


def test_truncated_labels_in_cache_are_refused(tmp_path):
    data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)
    (path,) = tmp_path.glob("glyphs-*.pt")
    obj = torch.load(path, weights_only=True)
    obj["y_train"] = obj["y_train"][:10]
    torch.save(obj, path)
    with pytest.raises(CorruptFileError, match="y_train"):
        data.glyphs_tensors(**SMALL, seed=0, root=tmp_path)


@pytest.mark.parametrize("kwargs, named", [
    ({"n_classes": len(data.GLYPH_CLASSES) + 1}, f"n_classes={len(data.GLYPH_CLASSES) + 1}"),
    ({"n_classes": 1}, "n_classes=1"),
    ({"size": 15}, "size=15"),
    ({"size": 32.0}, "size=32.0"),
    ({"difficulty": 1.5}, "difficulty=1.5"),
    ({"difficulty": -0.1}, "difficulty=-0.1"),
    ({"difficulty": float("nan")}, "difficulty=nan"),
    ({"difficulty": "impossible"}, "difficulty='impossible'"),
    ({"channels": 2}, "channels=2"),
    ({"n_train": 0}, "n_train=0"),
    ({"seed": -1}, "seed=-1"),
    ({"root": True}, "root=True"),
])
def test_bad_arguments_name_the_value(kwargs, named, tmp_path):
    with pytest.raises(InvalidInputError, match=named.replace(".", r"\.").replace("+", r"\+")):
        data.glyphs_tensors(**{**SMALL, "root": tmp_path, **kwargs})
    assert not list(tmp_path.iterdir())  # nothing generated or written


def test_loaders_batch_and_shuffle_with_the_seed(tmp_path):
    train, test = data.glyphs_loaders(**SMALL, batch_size=16, seed=0, root=tmp_path)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    again, _ = data.glyphs_loaders(**SMALL, batch_size=16, seed=0, root=tmp_path)
    assert torch.equal(next(iter(again))[1], y)
    assert sum(len(b[1]) for b in test) == 50
    with pytest.raises(InvalidInputError, match="batch_size=0"):
        data.glyphs_loaders(**SMALL, batch_size=0, root=tmp_path)


def test_cli_offers_glyphs(monkeypatch):
    from autoprune.cli import run

    assert "glyphs" in run.DATASETS
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return "train", "val"

    monkeypatch.setattr(data, "glyphs_loaders", fake)
    assert run.data_loaders("glyphs", (1, 3, 64, 64), seed=2) == ("train", "val")
    assert seen == {"size": 64, "channels": 3, "seed": 2}
    with pytest.raises(InvalidInputError, match="glyphs"):
        run.data_loaders("glyphs", (1, 3, 64, 32))
