"""Which weights does a convolution read when its input is smaller than its kernel's reach?

Chains of four 512->512 convolutions (3x3 with padding 1, and 1x1) at 1x1 and 2x2 spatial size,
timed interleaved on ONNX Runtime's CPU provider (one thread). At 1x1 a 3x3 conv's output only
ever meets its centre tap: if the runtime skips the taps that meet padding, the 3x3 chain (37.7
MB of weights) costs about what the 1x1 chain (4.2 MB) does; at 2x2 every tap is used.

    python benchmarks/bench_taps.py --repeats 3
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements per chain")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import pandas as pd
    import torch
    from torch import nn

    import autoprune as ap

    backend = ap.get_backend("onnxruntime-cpu", threads=args.threads)
    torch.manual_seed(0)

    def chain(k: int) -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Conv2d(512, 512, k, padding=k // 2), nn.ReLU()]
        return nn.Sequential(*layers).eval()

    chains = {"3x3 (37.7 MB)": chain(3), "1x1 (4.2 MB)": chain(1)}
    rows = []
    for size in (1, 2):
        x = torch.randn(1, 512, size, size)
        for rep in range(args.repeats):
            for name, s in zip(chains, backend.measure_interleaved(list(chains.values()), x)):
                rows.append((f"{size}x{size}", name, rep, s.median_ms))
    t = pd.DataFrame(rows, columns=["spatial", "chain of four convs", "repeat", "ms"])
    print(f"{backend.device_info().device_id}")
    print(t.groupby(["spatial", "chain of four convs"])["ms"]
          .agg(["median", "min", "max"]).round(3).to_string())


if __name__ == "__main__":
    main()
