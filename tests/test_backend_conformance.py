"""Every backend satisfies the ``Backend`` contract (``autoprune/backends/base.py``) the same way.

A new backend is one more entry in ``BACKENDS`` (its registry name → a factory building a
quick-protocol instance); a registered backend missing from ``BACKENDS`` fails the suite.
Backends whose runtime or hardware is absent here (torch-cuda, tensorrt without a GPU) skip
with the reason the backend itself gives.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _latency_helpers import conv2d
from torch import nn

import autoprune as ap
from autoprune.backends import backend_class
from autoprune.backends.base import Backend
from autoprune.errors import AutoPruneError, BackendUnavailable, InvalidInputError
from autoprune.measure import ProtocolSettings
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, OpKind, Structure

QUICK = ProtocolSettings.quick()

BACKENDS = {
    "onnxruntime-cpu": lambda: ap.get_backend("onnxruntime-cpu", threads=1, protocol=QUICK),
    "synthetic": lambda: ap.get_backend("synthetic", noise=0.05, seed=1, protocol=QUICK),
    "torch-cuda": lambda: ap.get_backend("torch-cuda", dtype="fp32", protocol=QUICK),
    "tensorrt": lambda: ap.get_backend("tensorrt", fp16=False, protocol=QUICK),
}
#: hardware the backend needs (the conftest skips marked tests without it)
_MARKS = {"torch-cuda": [pytest.mark.gpu], "tensorrt": [pytest.mark.gpu, pytest.mark.tensorrt]}

LAYERS = [
    conv2d(8, 16, 8, fused="bn+relu"),
    LayerSpec(OpKind.LINEAR, 64, 32, input_size=(4,)),
]


def _small():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


def _large():
    return nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
                         nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(96 * 8 * 8, 10)).eval()


X = torch.randn(1, 3, 8, 8)


@pytest.fixture(scope="module",
                params=[pytest.param(n, marks=_MARKS.get(n, [])) for n in sorted(BACKENDS)])
def backend(request) -> Backend:
    cls = backend_class(request.param)
    if not cls.is_available():
        pytest.skip(cls.unavailable_reason())
    return BACKENDS[request.param]()


def _check_sample(s: LatencySample, protocol: ProtocolSettings) -> None:
    assert isinstance(s, LatencySample)
    assert math.isfinite(s.median_ms) and s.median_ms > 0, s
    assert math.isfinite(s.iqr_ms) and s.iqr_ms >= 0, s
    assert protocol.min_runs <= s.n_runs <= protocol.max_runs, s
    assert 0 < s.min_ms <= s.median_ms, s
    assert math.isfinite(s.spread) and s.spread >= 0


def test_every_registered_backend_is_in_the_suite():
    assert sorted(BACKENDS) == ap.list_backends()


@pytest.mark.parametrize("name", sorted(BACKENDS), ids=[f"name={n}" for n in sorted(BACKENDS)])
def test_an_unavailable_backend_refuses_to_construct_and_says_why(name):
    cls = backend_class(name)
    if cls.is_available():
        pytest.skip(f"{name} is available here")
    reason = cls.unavailable_reason()
    assert repr(name) in reason and len(reason) > len(repr(name)) + 10
    with pytest.raises(BackendUnavailable) as e:
        BACKENDS[name]()
    assert str(e.value) == reason


def test_identity_and_registration(backend):
    cls = type(backend)
    assert backend_class(backend.name) is cls and isinstance(backend, Backend)
    assert isinstance(cls.is_available(), bool) and cls.is_available()
    assert cls.requirement and repr(cls.name) in cls.unavailable_reason()
    assert backend.protocol == QUICK
    assert repr(backend).startswith(f"{cls.__name__}(")


def test_device_info_is_stable_and_json_round_trips(backend):
    info = backend.device_info()
    assert isinstance(info, DeviceInfo) and info.backend == backend.name
    assert info.device_name and info.arch and info.runtime
    assert info.threads >= 1 and info.precision
    assert backend.device_info() is info  # cached per instance
    # a second instance with the same options fingerprints the same device
    again = BACKENDS[backend.name]().device_info()
    assert again == info and again.device_id == info.device_id
    d = json.loads(json.dumps(info.to_dict()))
    assert DeviceInfo.from_dict(d) == info
    assert info.device_id.startswith(f"{backend.name}_")
    assert all(c.isalnum() or c in "-_." for c in info.device_id), info.device_id
    hash(info)  # frozen: usable as a key


def test_dense_and_channel_are_always_accelerated(backend):
    for s in (Structure.NONE, Structure.CHANNEL, "none", "channel"):
        assert backend.accelerates(s) is True
        assert backend.accelerates(s, LAYERS[0]) is True
    assert isinstance(backend.accelerates(Structure.NM, LAYERS[1]), bool)
    assert backend.accelerates(Structure.BLOCK) is False


def test_measure_layer_returns_the_documented_statistics(backend):
    for spec in LAYERS:
        _check_sample(backend.measure_layer(spec), backend.protocol)
    # structures by name; channel is dense at the given widths
    _check_sample(backend.measure_layer(LAYERS[0], "channel"), backend.protocol)
    _check_sample(backend.measure_layer(LAYERS[1], Structure.NM, 0.5), backend.protocol)
    _check_sample(backend.measure_layer(LAYERS[1], "unstructured", 0.3), backend.protocol)


def test_measure_layers_gives_one_sample_per_item_in_order(backend):
    items = [(conv2d(8, 8, 8), Structure.NONE, 1.0), (conv2d(128, 128, 8), Structure.NONE, 1.0),
             (conv2d(8, 8, 8), Structure.NONE, 1.0)]
    got = backend.measure_layers(items)
    assert len(got) == 3
    for s in got:
        _check_sample(s, backend.protocol)
    # real timings, in the order given: the layer with 256x the work is the slow one
    assert got[1].median_ms > got[0].median_ms and got[1].median_ms > got[2].median_ms
    assert backend.measure_layers([]) == []


def test_measure_model_and_interleaved(backend):
    _check_sample(backend.measure_model(_small(), X), backend.protocol)
    _check_sample(backend.measure_model(_small(), (X,)), backend.protocol)
    small, large = backend.measure_interleaved([_small(), _large()], X)
    _check_sample(small, backend.protocol)
    _check_sample(large, backend.protocol)
    assert large.median_ms > small.median_ms


def test_measure_ratio_is_paired_and_ordered(backend):
    ratio, iqr = backend.measure_ratio(_large(), _small(), X)
    assert math.isfinite(ratio) and ratio > 1 and math.isfinite(iqr) and iqr >= 0
    inverse, _ = backend.measure_ratio(_small(), _large(), X)
    assert 0 < inverse < 1


def test_masked_models_are_measured(backend):
    from autoprune.masks import set_mask

    m = _small()
    set_mask(m, "4.weight", torch.rand_like(m[4].weight) > 0.5)
    _check_sample(backend.measure_model(m, X), backend.protocol)


@pytest.mark.parametrize("call, match", [
    (lambda b: b.measure_layer(LAYERS[0], "bogus"), "bogus"),
    (lambda b: b.accelerates("bogus"), "bogus"),
    (lambda b: b.measure_layer(LAYERS[0], "block"), "block"),
    (lambda b: b.measure_layer(LAYERS[1], "unstructured", 1.5), "density"),
    (lambda b: b.measure_layer(LAYERS[1], "unstructured", 0.0), "density"),
    (lambda b: b.measure_layer(LAYERS[1], "nm", float("nan")), "density"),
    (lambda b: b.measure_layers([(LAYERS[1], Structure.NONE, -1.0)]), "density"),
    (lambda b: b.measure_interleaved([], X), "at least one model"),
])
def test_bad_input_is_an_invalid_input_error(backend, call, match):
    with pytest.raises(InvalidInputError, match=match):
        call(backend)


def test_inputs_the_model_cannot_run_on_are_a_project_error(backend):
    with pytest.raises(AutoPruneError):
        backend.measure_model(_small(), torch.randn(1, 5, 8, 8))
