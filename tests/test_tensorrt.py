"""TensorRT backend: log parsing, layer-name mapping and time attribution (pure Python, always
run); engine building and timing need TensorRT + a GPU (marked, skipped here with a reason)."""

from __future__ import annotations

import pytest

from autoprune.backends.tensorrt import (
    attribute_layer_times,
    engine_layer_names,
    is_reformat_layer,
    onnx_node_to_module,
    parse_sparsity_log,
    split_fused_name,
    split_top_level,
    trt_layer_modules,
)

LOG = [
    "[I] [TRT] Detected 1 inputs and 1 output network tensors.",
    "[I] [TRT] (Sparsity) Layers eligible for sparse math: /conv1/Conv + /relu/Relu, "
    "/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu, /fc/Gemm",
    "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "
    "/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu",
]


def test_parse_sparsity_log():
    r = parse_sparsity_log(LOG)
    assert r.eligible == ["/conv1/Conv + /relu/Relu",
                          "/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu", "/fc/Gemm"]
    assert r.picked == ["/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu"]
    assert r.eligible_modules() == ["conv1", "relu", "layer1.0.conv1", "layer1.0.relu", "fc"]
    assert r.picked_modules() == ["layer1.0.conv1", "layer1.0.relu"]
    empty = parse_sparsity_log([
        "[TensorRT] INFO: (Sparsity) Layers eligible for sparse math: Conv_0",
        "[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:",
    ])
    assert empty.eligible == ["Conv_0"] and empty.picked == []


def test_onnx_node_to_module():
    assert onnx_node_to_module("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert onnx_node_to_module("/features/features.3/conv/conv.0/conv.0.0/Conv") == \
        "features.3.conv.0.0"
    assert onnx_node_to_module("/conv1/Conv") == "conv1"
    assert onnx_node_to_module("Conv_12") is None
    assert onnx_node_to_module("/Add") is None


def test_split_fused_names():
    assert split_fused_name("conv1 + bn1 + relu") == ["conv1", "bn1", "relu"]
    assert split_fused_name("PWN(/act/Sigmoid, /act/Mul)") == ["/act/Sigmoid", "/act/Mul"]
    assert split_fused_name("/a/Conv + PWN(PWN(/b/Sigmoid), /b/Mul)") == \
        ["/a/Conv", "/b/Sigmoid", "/b/Mul"]
    assert split_fused_name("{ForeignNode[/attn/MatMul.../attn/Softmax]}") == \
        ["/attn/MatMul", "/attn/Softmax"]
    assert split_fused_name("Reformatting CopyNode for Input Tensor 0 to /conv1/Conv") == \
        ["/conv1/Conv"]
    assert split_top_level("a(b, c), d", ",") == ["a(b, c)", "d"]
    assert trt_layer_modules("conv1 + bn1 + relu") == ["conv1", "bn1", "relu"]
    assert trt_layer_modules("/layer1/layer1.0/conv2/Conv + /layer1/layer1.0/Add + "
                             "/layer1/layer1.0/relu_1/Relu") == \
        ["layer1.0.conv2", "layer1.0", "layer1.0.relu_1"]


def test_attribute_layer_times_folds_reformatters():
    times = [
        ("Reformatting CopyNode for Input Tensor 0 to /conv1/Conv + /relu/Relu", 0.01),
        ("/conv1/Conv + /relu/Relu", 0.10),
        ("/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu", 0.20),
        ("/fc/Gemm", 0.05),
        ("Reformatting CopyNode for Output Tensor 0 to /fc/Gemm", 0.02),
    ]
    out = attribute_layer_times(times)
    assert out == pytest.approx({"conv1": 0.11, "layer1.0.conv1": 0.20, "fc": 0.07})
    assert is_reformat_layer(times[0][0]) and not is_reformat_layer(times[1][0])


def test_engine_layer_names_from_inspector_json():
    detailed = '{"Layers": [{"Name": "/conv1/Conv + /relu/Relu", "LayerType": "CaskConvolution"}]}'
    assert engine_layer_names(detailed) == ["/conv1/Conv + /relu/Relu"]
    assert engine_layer_names('{"Layers": ["a", "b"]}') == ["a", "b"]


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_builds_times_and_profiles():  # pragma: no cover - needs TensorRT + GPU
    import torch
    from torch import nn

    import autoprune as ap
    from autoprune.backends.micro import nm_mask
    from autoprune.measure import ProtocolSettings

    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
                          nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(nm_mask(m.weight))
    x = torch.randn(1, 256, 32, 32)
    b = ap.get_backend("tensorrt", fp16=True, sparse_weights=True,
                       protocol=ProtocolSettings.quick())
    s = b.measure_model(model, x)
    assert s.median_ms > 0
    assert b.last_sparsity is not None and b.last_sparsity.eligible_modules()
    per_module = b.profile_layers(model, x, runs=5)
    assert "0" in per_module and all(v >= 0 for v in per_module.values())
    assert b.measure_layer(
        ap.LayerSpec(ap.OpKind.CONV2D, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16),
                     fused="bn+relu")).median_ms > 0


def test_node_names_of_real_exports_map_to_modules():
    import onnx
    import torch
    import torchvision

    from autoprune.onnx_export import to_onnx

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    proto = onnx.load_from_string(to_onnx(model, torch.randn(1, 3, 32, 32)))
    modules = dict(model.named_modules())
    nodes = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(nodes) == 53
    assert all(onnx_node_to_module(n) in modules for n in nodes)
