"""Backends: registry, ONNX Runtime CPU on real sessions, micro-models, synthetic ground truth,
GPU backends unavailable here (their hardware tests are marked and skip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _latency_helpers import conv2d
from torch import nn

import autoprune as ap
from autoprune.backends.micro import build_micro_model, nm_mask, random_mask
from autoprune.errors import BackendUnavailable, InvalidInputError, UnknownNameError
from autoprune.measure import ProtocolSettings
from autoprune.types import LayerSpec, OpKind, Structure

QUICK = ProtocolSettings.quick()


@pytest.fixture(scope="module")
def ort():
    return ap.get_backend("onnxruntime-cpu", threads=1, protocol=QUICK)


def test_registry_names_and_unknown():
    assert ap.list_backends() == ["onnxruntime-cpu", "synthetic", "tensorrt", "torch-cuda"]
    assert "onnxruntime-cpu" in ap.list_backends(available_only=True)
    with pytest.raises(UnknownNameError) as e:
        ap.get_backend("onnxruntime-gpu")
    assert "onnxruntime-cpu" in str(e.value) and "tensorrt" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_backends_unavailable_say_what_to_install():
    with pytest.raises(BackendUnavailable, match="torch"):
        ap.get_backend("torch-cuda")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        ap.get_backend("tensorrt")


def test_ort_options_validated():
    with pytest.raises(InvalidInputError, match="threads"):
        ap.get_backend("onnxruntime-cpu", threads=0)
    with pytest.raises(InvalidInputError, match="graph_optimization_level"):
        ap.get_backend("onnxruntime-cpu", graph_optimization_level="max")
    with pytest.raises(BackendUnavailable, match="XnnpackExecutionProvider"):
        import onnxruntime

        if "XnnpackExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("this onnxruntime build has XNNPACK")
        ap.get_backend("onnxruntime-cpu", providers=["XnnpackExecutionProvider"])


def test_ort_device_info(ort):
    info = ort.device_info()
    assert info.backend == "onnxruntime-cpu" and info.threads == 1
    assert info.device_name and info.runtime.startswith("onnxruntime ")
    assert info.arch
    if info.arch == "x86_64":
        assert "avx" in info.isa_flags or "sse4_2" in info.isa_flags
    # threads and options change the fingerprint (tables of 1 and 2 threads stay apart)
    other = ap.get_backend("onnxruntime-cpu", threads=2).device_info()
    assert other.device_id != info.device_id and other.diff(info) == ["threads"]


def test_ort_measures_real_layer_sessions(ort):
    spec = conv2d(16, 32, 8, fused="bn+add+relu")
    s = ort.measure_layer(spec)
    assert s.median_ms > 0 and s.iqr_ms >= 0 and s.n_runs >= QUICK.min_runs
    lin = ort.measure_layer(LayerSpec(OpKind.LINEAR, 64, 10))
    assert lin.median_ms > 0 and lin.n_runs >= QUICK.min_runs
    # a layer with 16x the work is measurably slower (real timing, not a constant)
    big = ort.measure_layers([(conv2d(16, 16, 8), Structure.NONE, 1.0),
                              (conv2d(256, 256, 8), Structure.NONE, 1.0)])
    assert big[1].median_ms > 2 * big[0].median_ms


def test_reorder_share_read_from_profile_events():
    from autoprune.bundle_runner import in_context_ms, reorder_share_from_profile

    def ev(name, op, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur,
                "args": {"op_name": op}}

    def run(dur):
        return {"cat": "Session", "name": "model_run", "dur": dur}

    # two runs of a micro-model: reorder in (10, 30 us), conv (500, 520), reorder out (4, 6)
    events = [ev("r_in", "ReorderInput", 10), ev("c", "Conv", 500), ev("r_out", "ReorderOutput", 4),
              run(600),
              ev("r_in", "ReorderInput", 30), ev("c", "Conv", 520), ev("r_out", "ReorderOutput", 6),
              run(800)]
    assert reorder_share_from_profile(events, runs=2) == pytest.approx((20 + 5) / 700)
    assert reorder_share_from_profile(events, runs=1) == pytest.approx((30 + 6) / 800)
    assert reorder_share_from_profile([ev("c", "Conv", 500), run(600)], runs=1) == 0.0
    assert in_context_ms(2.0, 0.25) == pytest.approx(1.5)
    assert in_context_ms(1.0, 1.0) == pytest.approx(0.1)  # at most nine tenths taken off


def test_ort_layer_timing_option_and_fingerprint():
    with pytest.raises(InvalidInputError, match="layer_timing"):
        ap.get_backend("onnxruntime-cpu", layer_timing="warm")
    a = ap.get_backend("onnxruntime-cpu").device_info()
    b = ap.get_backend("onnxruntime-cpu", layer_timing="isolated").device_info()
    assert dict(a.extra)["layer_timing"] == "in-context"
    assert a.device_id != b.device_id  # tables timed the two ways never mix


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"),
                    reason="ONNX Runtime's blocked (NCHWc) conv layout is an x86 CPU path")
def test_ort_in_context_timing_drops_layout_reorders(ort):
    from autoprune import bundle_runner
    from autoprune.onnx_export import to_onnx

    # a memory-bound depthwise conv whose 96 channels suit the blocked layout: its micro-model
    # converts the 56x56 input into the blocked layout and the output back, which costs about
    # as much as the conv itself; a linear layer has no layout to convert
    dw = LayerSpec(OpKind.DWCONV2D, 96, 96, (3, 3), (1, 1), (1, 1), (1, 1), 96, (56, 56),
                   fused="bn+relu6")
    model, inputs = build_micro_model(dw, Structure.NONE, 1.0)
    assert 0.2 < bundle_runner.layout_reorder_share(to_onnx(model, inputs)) < 1.0
    lin, lin_in = build_micro_model(LayerSpec(OpKind.LINEAR, 64, 10), Structure.NONE, 1.0)
    assert bundle_runner.layout_reorder_share(to_onnx(lin, lin_in)) == 0.0
    isolated = ap.get_backend("onnxruntime-cpu", protocol=QUICK, layer_timing="isolated")
    both = [ort.measure_layer(dw).median_ms, isolated.measure_layer(dw).median_ms]
    assert both[0] < 0.8 * both[1], both


def test_ort_measures_models_interleaved_and_ratio(ort):
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    large = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(128, 128, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    s = ort.measure_model(small, x)
    assert s.median_ms > 0 and s.n_runs >= QUICK.min_runs
    a, b = ort.measure_interleaved([small, large], x)
    assert b.median_ms > a.median_ms
    ratio, iqr = ort.measure_ratio(large, small, x)
    assert ratio > 1.5 and iqr >= 0


@pytest.mark.parametrize("fused", ["bn+relu", "bn+add+relu", "relu6", "bn+hardswish", ""])
def test_micro_model_exports_and_matches_torch(fused):
    import onnxruntime as ort_mod

    from autoprune.onnx_export import to_onnx

    spec = conv2d(8, 16, 6, fused=fused)
    model, inputs = build_micro_model(spec)
    expected = model(*inputs).detach().numpy()
    sess = ort_mod.InferenceSession(to_onnx(model, inputs), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)[0]
    assert got.shape == (1, 16, 6, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_micro_model_kinds_and_unknown_fused():
    for spec in [
        LayerSpec(OpKind.CONV1D, 4, 8, (3,), (2,), (1,), (1,), 1, (20,), fused="bn+relu"),
        LayerSpec(OpKind.DWCONV2D, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, (6, 6),
                  fused="bn+relu6"),
        LayerSpec(OpKind.LINEAR, 16, 4, input_size=(5,), fused="gelu"),
        LayerSpec(OpKind.ATTENTION, 32, 32, groups=4, input_size=(7,)),
    ]:
        model, inputs = build_micro_model(spec)
        y = model(*inputs)
        assert y.numel() > 0
    with pytest.raises(InvalidInputError, match="frobnicate"):
        build_micro_model(conv2d(4, 4, 4, fused="bn+frobnicate"))


def test_masks_patterns():
    w = torch.randn(8, 16, 3, 3)
    m = nm_mask(w, 2, 4)
    groups = m.permute(0, 2, 3, 1).reshape(8, 3, 3, 4, 4)
    assert bool((groups.sum(-1) == 2).all())
    # the kept two are the largest in magnitude of each group of four input channels
    wa = w.abs().permute(0, 2, 3, 1).reshape(8, 3, 3, 4, 4)
    kept_min = torch.where(groups, wa, torch.inf).min(-1).values
    dropped_max = torch.where(~groups, wa, -torch.inf).max(-1).values
    assert bool((kept_min >= dropped_max).all())
    r = random_mask(w, 0.3)
    assert int(r.sum()) == round(0.3 * w.numel())
    model, _ = build_micro_model(conv2d(16, 8, 4), Structure.NM, 0.5)
    assert float((model.layer.weight == 0).float().mean()) == pytest.approx(0.5)


def test_synthetic_staircase_and_noise():
    b = ap.get_backend("synthetic", alignment=16, noise=0.0)
    base = conv2d(32, 16, 8)
    c = [b.layer_cost_ms(base.with_channels(32, w)) for w in (1, 9, 16, 17, 32)]
    assert c[0] == c[1] == c[2] < c[3] == c[4]
    s = b.measure_layer(base)
    assert s.median_ms == pytest.approx(c[2]) and s.iqr_ms == 0.0
    noisy = ap.get_backend("synthetic", alignment=16, noise=0.1, seed=3)
    ns = noisy.measure_layer(base)
    assert ns.iqr_ms > 0 and ns.median_ms == pytest.approx(c[2], rel=0.2)
    again = ap.get_backend("synthetic", alignment=16, noise=0.1, seed=3).measure_layer(base)
    assert again == ns  # seeded
    custom = ap.get_backend("synthetic", cost_fn=lambda sp, st, d: float(sp.out_channels))
    assert custom.measure_layer(base).median_ms == 16.0


def test_synthetic_model_cost_is_layer_sum_plus_whole_model_term():
    pytest.importorskip("autoprune._analyze")
    from autoprune._analyze import analyze

    b = ap.get_backend("synthetic", alignment=8, noise=0.0, model_overhead_ms=0.5,
                       cache_mb=0.0, cache_penalty_ms_per_mb=1.0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 20, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(20 * 6 * 6, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    spec = analyze(model, x)
    layer_sum = sum(b.layer_cost_ms(lay.spec) for lay in spec.layers.values())
    params_mb = sum(lay.spec.params for lay in spec.layers.values()) * 4 / 1e6
    total = b.measure_model(model, x).median_ms
    assert total == pytest.approx(layer_sum + 0.5 + params_mb)


@pytest.mark.gpu
def test_torch_cuda_measures_and_2to4_linear():  # pragma: no cover - needs a GPU
    b = ap.get_backend("torch-cuda", dtype="fp16", protocol=QUICK)
    info = b.device_info()
    assert info.arch.startswith("sm_") and info.device_name
    spec = LayerSpec(OpKind.LINEAR, 1024, 1024, input_size=(256,))
    dense = b.measure_layer(spec)
    assert dense.median_ms > 0
    if b.accelerates(Structure.NM, spec):
        sparse = b.measure_layer(spec, Structure.NM, 0.5)
        assert sparse.median_ms > 0
    graphs = ap.get_backend("torch-cuda", cuda_graphs=True, protocol=QUICK)
    assert graphs.measure_layer(conv2d(64, 64, 16)).median_ms > 0


def test_public_functions_survive_import_of_their_modules():
    # the implementation modules are private, so importing them never rebinds ap.analyze /
    # ap.search to a module: they stay the functions the README calls
    import importlib

    importlib.import_module("autoprune._analyze")
    importlib.import_module("autoprune._search")
    importlib.import_module("autoprune._finetune")
    assert callable(ap.finetune) and ap.finetune.__name__ == "finetune"
    assert callable(ap.analyze) and ap.analyze.__name__ == "analyze"
    assert callable(ap.search) and ap.search.__name__ == "search"
    assert ap.errors.TableMissError is not None  # the errors module stays a module
