"""verify / export: nm pattern survives ONNX export (read back from the initializers), verify
reports measured, paired and predicted latency, TensorRT says what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoprune import masks
from autoprune.errors import BackendUnavailable
from autoprune.export import VerifyReport, export_onnx, export_tensorrt, onnx_nm_report, verify


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _masked_net() -> nn.Sequential:
    model = _net()
    for m in model.modules():  # BN statistics that are not trivial (the fold must keep zeros)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
    masks.set_mask(model, "3.weight", masks.nm_mask(model[3].weight.abs(), 2, 4))
    masks.set_mask(model, "8.weight", masks.nm_mask(model[8].weight.abs(), 2, 4))
    return model.eval()


def test_export_keeps_nm_pattern_in_onnx_initializers(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = _masked_net()
    x = torch.randn(1, 3, 16, 16)
    path = export_onnx(model, x, tmp_path / "m.onnx")
    rep = onnx_nm_report(path)
    # three weight tensors: conv0 (dense, 3 inputs), conv3 (2:4), linear (2:4)
    assert sorted(rep.values()) == [False, True, True]
    # read the masked conv's initializer directly: exactly half the weights are zero, 2 per 4
    mdl = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in mdl.graph.initializer}
    convs = [n for n in mdl.graph.node if n.op_type == "Conv"]
    w = inits[convs[1].input[1]]
    assert w.shape == (32, 16, 3, 3)
    groups = (w.transpose(0, 2, 3, 1).reshape(32, 3, 3, 4, 4) != 0).sum(-1)
    assert np.all(groups == 2)
    # the exported model computes what the masked PyTorch model computes
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    # the model itself still carries its masks (export bakes a copy)
    assert set(masks.get_masks(model)) == {"3.weight", "8.weight"}


def test_dense_export_has_no_nm_claims(tmp_path):
    model = _net().eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "d.onnx")
    assert not any(onnx_nm_report(path).values())


def _backend():
    from autoprune.backends import get_backend
    from autoprune.measure import ProtocolSettings

    return get_backend("onnxruntime-cpu", threads=1, protocol=ProtocolSettings.quick())


def test_verify_reports_measured_paired_and_predicted():
    small = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    big = nn.Sequential(nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(),
                        nn.Flatten(), nn.LazyLinear(10))
    x = torch.randn(1, 3, 24, 24)
    small(x), big(x)
    rep = verify(small, x, _backend(), budget_ms=1e3, reference=big, predicted_ms=0.01)
    assert isinstance(rep, VerifyReport)
    assert rep.measured.median_ms > 0 and rep.reference is not None
    assert rep.ratio is not None and rep.ratio < 0.7  # the small model is clearly faster
    assert rep.speedup == pytest.approx(1 / rep.ratio)
    assert rep.paired_ms == pytest.approx(rep.ratio * rep.reference.median_ms)
    assert rep.budget_met is True
    assert rep.prediction_error is not None and rep.prediction_error < 0
    d = rep.to_dict()
    assert d["budget_met"] is True and d["measured"]["median_ms"] > 0
    assert "paired ratio" in str(rep) and "MET" in str(rep)
    # an impossible budget is reported as not met
    tight = verify(small, x, _backend(), budget_ms=1e-6)
    assert tight.budget_met is False and tight.ratio is None
    assert "NOT MET" in str(tight)


def test_export_tensorrt_without_tensorrt_says_what_to_install(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    path = export_onnx(_net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        export_tensorrt(path, tmp_path / "m.plan")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_export_tensorrt_builds_engine(tmp_path):
    model = _masked_net()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    engine = export_tensorrt(path, tmp_path / "m.plan", fp16=True, sparse_weights=True)
    assert engine.stat().st_size > 1000


def test_verify_report_reanchors_the_prediction_to_dense_measured_now():
    """A device 25% slower than when the latency model was fitted: the absolute prediction is
    off by the drift, the re-anchored one by the model's own error on the share of dense."""
    from autoprune.export import VerifyReport
    from autoprune.measure import LatencySample

    r = VerifyReport("ort", LatencySample(1.5, 0.1, 30, 1.4), predicted_ms=0.9,
                     reference=LatencySample(4.0, 0.2, 30, 3.9), ratio=0.375,
                     predicted_reference_ms=3.2)
    assert r.device_drift == pytest.approx(0.25)
    assert r.predicted_now_ms == pytest.approx(0.9 / 3.2 * 4.0)
    assert r.predicted_now_ms / r.latency_ms - 1 == pytest.approx(r.ratio_prediction_error)
    assert r.prediction_error == pytest.approx(0.9 / 1.5 - 1)
    text = str(r)
    assert "at the device's speed now" in text and "predicted, +25.0%" in text
    assert r.to_dict()["predicted_now_ms"] == pytest.approx(r.predicted_now_ms)
    bare = VerifyReport("ort", LatencySample(1.5, 0.1, 30, 1.4), predicted_ms=1.4)
    assert bare.predicted_now_ms is None and bare.device_drift is None
    assert "speed now" not in str(bare) and "1.4 ms" in str(bare)


def test_verify_report_takes_the_share_against_dense_as_measured_during_the_fit():
    """The latency model's targets are on the scale of dense measured during its fit; its own
    prediction for the dense plan (here 20% low, an extreme plan) must not skew the share."""
    from autoprune.export import VerifyReport
    from autoprune.measure import LatencySample

    r = VerifyReport("ort", LatencySample(1.5, 0.1, 30, 1.4), predicted_ms=0.9,
                     reference=LatencySample(4.0, 0.2, 30, 3.9), ratio=0.375,
                     predicted_reference_ms=3.2, fitted_reference_ms=4.0)
    assert r.predicted_ratio == pytest.approx(0.9 / 4.0)
    assert r.device_drift == pytest.approx(0.0)
    assert r.ratio_prediction_error == pytest.approx(0.9 / 4.0 / 0.375 - 1)
    assert "4 ms during the fit (3.2 predicted), +0.0%" in str(r)
    assert r.to_dict()["fitted_reference_ms"] == 4.0
