"""``torch-cuda``: PyTorch eager (optionally CUDA graphs) on an NVIDIA GPU, timed with CUDA events.

* ``dtype``: "fp16" (default), "bf16" or "fp32"; the model and inputs are cast to it.
* ``cuda_graphs``: capture the forward once and time ``graph.replay()`` (removes Python and
  launch overhead, which otherwise dominates small layers).
* 2:4 (``nm``): linear layers whose weights follow the 2:4 pattern are converted with
  ``torch.sparse.to_sparse_semi_structured`` (fp16/bf16, compute capability >= 8.0) so they
  run on sparse tensor cores; other layers run dense with zeros (no sparse conv kernel in
  PyTorch). ``accelerates(nm, spec)`` is True only for linear layers.
* Device fingerprint: GPU name, driver, max SM/memory clocks from ``pynvml`` (nvidia-ml-py),
  compute capability as ``sm_XY``, torch and CUDA versions.

Timings: per sample, an event is recorded before and after ``calls_per_sample`` runs on the
current stream and the elapsed GPU time is read after synchronising.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from autoprune.backends.base import Backend, as_structure
from autoprune.errors import BackendUnavailable, InvalidInputError
from autoprune.measure import ProtocolSettings, TimedCall
from autoprune.types import DeviceInfo, LayerSpec, OpKind, Structure

TorchDType = Literal["fp16", "bf16", "fp32"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PRECISION = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive input elements (dim 1, per row) has <= 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nz = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((nz <= 2).all())


def sparsify_linears(model: nn.Module) -> list[str]:
    """Swap the weights of 2:4-patterned ``nn.Linear`` layers for semi-structured sparse tensors
    (in place; the model must already be on the GPU in fp16/bf16). Returns converted names."""
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and _sparse_shape_ok(mod.out_features, mod.in_features) \
                and is_2to4(mod.weight.detach()):
            mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()),
                                      requires_grad=False)
            done.append(name)
    return done


def _sparse_shape_ok(out_features: int, in_features: int) -> bool:
    """fp16/bf16 semi-structured weights need rows % 32 == 0 and columns % 64 == 0."""
    return out_features >= 32 and out_features % 32 == 0 and in_features >= 64 \
        and in_features % 64 == 0


def gpu_fingerprint(index: int = 0) -> dict[str, str]:
    """GPU name, driver and max clocks via pynvml (nvidia-ml-py); {} fields if NVML fails."""
    out = {"name": "", "driver": "", "clocks": ""}
    try:
        import pynvml
    except ImportError:
        return out
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVML missing (no driver)
        return out
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        drv = pynvml.nvmlSystemGetDriverVersion()
        out["name"] = name.decode() if isinstance(name, bytes) else str(name)
        out["driver"] = drv.decode() if isinstance(drv, bytes) else str(drv)
        sm = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        mem = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        out["clocks"] = f"sm_max={sm}MHz mem_max={mem}MHz"
    except Exception:  # noqa: BLE001 - partial info is still a fingerprint
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return out


class TorchCUDABackend(Backend):
    """PyTorch on an NVIDIA GPU. Options: ``dtype`` ("fp16"|"bf16"|"fp32"), ``cuda_graphs``,
    ``device_index``."""

    name = "torch-cuda"
    requirement = "an NVIDIA GPU and a CUDA build of torch (pip install torch; see pytorch.org)"

    def __init__(
        self,
        dtype: TorchDType = "fp16",
        cuda_graphs: bool = False,
        device_index: int = 0,
        protocol: ProtocolSettings | None = None,
    ) -> None:
        super().__init__(protocol)
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs
        self.device_index = device_index
        if dtype not in _DTYPES:
            raise InvalidInputError(f"dtype={dtype!r}; use one of {sorted(_DTYPES)}")
        self._require()

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        if not torch.version.cuda:
            return (f"backend 'torch-cuda' needs a CUDA build of torch (this one is "
                    f"{torch.__version__}, CPU only); install one from pytorch.org")
        return "backend 'torch-cuda' found no usable NVIDIA GPU (torch.cuda.is_available() is False)"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def _make_device_info(self) -> DeviceInfo:
        props = torch.cuda.get_device_properties(self.device_index)
        gpu = gpu_fingerprint(self.device_index)
        return DeviceInfo(
            backend=self.name,
            device_name=gpu["name"] or props.name,
            arch=f"sm_{props.major}{props.minor}",
            runtime=f"torch {torch.__version__} cuda {torch.version.cuda}",
            threads=1,
            precision=_PRECISION[self.dtype],
            driver=gpu["driver"],
            clocks=gpu["clocks"],
            extra=(("cuda_graphs", str(bool(self.cuda_graphs))),),
        )

    @property
    def min_alignment(self) -> int:
        """Smallest channel step the profiler may detect on this backend.

        On a GPU the alignment sweep of a small layer is launch-bound and flat (it fits step 1),
        yet cuBLAS/cuDNN fall back to slow non-tensor-core or unvectorised kernels when a GEMM
        dimension is not a multiple of 16 bytes: 8 elements in fp16/bf16, 4 in fp32. Measured on
        an H100 (BENCHMARKS.md, "GPU"), widths that are not multiples of 8 ran much slower.
        """
        return 8 if self.dtype in ("fp16", "bf16") else 4

    def accelerates(self, structure: Structure | str, spec: LayerSpec | None = None) -> bool:
        s = as_structure(structure)
        if s == Structure.NM:
            major = torch.cuda.get_device_capability(self.device_index)[0]
            ok = major >= 8 and self.dtype in ("fp16", "bf16")
            return ok and (
                spec is None
                or (spec.op == OpKind.LINEAR and _sparse_shape_ok(spec.out_channels, spec.in_channels))
            )
        return s in (Structure.NONE, Structure.CHANNEL)

    def _timer_for_model(self, model: nn.Module, example_inputs: Any) -> TimedCall:
        from autoprune.onnx_export import as_input_tuple, bake_if_masked

        dt = _DTYPES[self.dtype]
        m = copy.deepcopy(bake_if_masked(model)).eval().to(self.device, dt)
        if self.dtype in ("fp16", "bf16"):
            try:
                sparsify_linears(m)
            except (RuntimeError, ValueError) as e:  # shape/arch the sparse kernels refuse
                raise BackendUnavailable(
                    f"to_sparse_semi_structured refused a 2:4 layer on this GPU: {e}"
                ) from e
        args = tuple(
            a.to(self.device, dt) if a.is_floating_point() else a.to(self.device)
            for a in as_input_tuple(example_inputs)
        )

        def forward() -> None:
            with torch.inference_mode():
                m(*args)

        run = forward
        if self.cuda_graphs:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    forward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                m(*args)
            run = graph.replay
        for _ in range(3):
            run()
        torch.cuda.synchronize(self.device)
        # calls per sample so a sample is >= min_sample_ms
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-4)
        n = 1 if one >= self.protocol.min_sample_ms else int(
            min(1000, -(-self.protocol.min_sample_ms // one))
        )

        def timed() -> float:
            start.record()
            for _ in range(n):
                run()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / n

        timed.keepalive = (m, args)  # type: ignore[attr-defined]
        return timed

    def options_repr(self) -> str:
        return f"dtype={self.dtype!r}, cuda_graphs={self.cuda_graphs}"
