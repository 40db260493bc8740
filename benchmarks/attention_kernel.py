"""stablepipe's compiled CPU attention kernel against aten's `scaled_dot_product_attention`, same inputs, same run.

    python benchmarks/attention_kernel.py --threads 2 --rounds 5
    python benchmarks/attention_kernel.py --threads 1 --dtype bfloat16 --shapes sd15

Every self- and cross-attention shape of SD 1.5 at 512 px and SDXL at 1024 px, batch 2 (one guided step):
(batch, heads, queries, keys, head size). Per shape: best seconds of each, GFLOP/s (4 N M d per head), the
speed-up (median over paired rounds of aten's time / the kernel's), and the max abs difference of each from
float64 attention. With --threads 1 the clock is the thread's CPU time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import DTYPES, machine, paired  # noqa: E402

from stablepipe.kernels.attention import scaled_dot_product_attention  # noqa: E402
from stablepipe.kernels.build import compiled_ops  # noqa: E402

SHAPES = {  # (batch, heads, queries, keys, head size)
    "sd15": [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
             (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160)],
    "sdxl": [(2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64)],
}  # fmt: skip


def error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Max abs difference from float64 attention, on the first batch entry and head (cheap for 4096 x 4096)."""
    reference = F.scaled_dot_product_attention(*(t[:1, :1].double() for t in (q, k, v)))
    return (out[:1, :1].double() - reference).abs().max().item()


def run_shape(shape: tuple[int, ...], dtype: torch.dtype, rounds: int, ops) -> str:
    b, h, n, m, d = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=generator).to(dtype)
    k, v = (torch.randn(b, h, m, d, generator=generator).to(dtype) for _ in range(2))
    scale = d**-0.5
    fns = {"aten": lambda: F.scaled_dot_product_attention(q, k, v), "kernel": lambda: ops.attention(q, k, v, scale, 64)}
    if dtype == torch.float32:  # what stablepipe's dispatch does with it (aten for long float32 sequences)
        fns["dispatch"] = lambda: scaled_dot_product_attention(q, k, v)
    results = paired(fns, rounds)
    flops = 4 * b * h * n * m * d
    parts = [f"{str(shape):28s}"]
    for name, (seconds, speedup) in results.items():
        parts.append(f"{name} {seconds * 1e3:8.2f} ms {flops / seconds / 1e9:5.0f} GFLOP/s x{speedup:.2f}")
    errs = f"err aten {error(fns['aten'](), q, k, v):.1e} kernel {error(fns['kernel'](), q, k, v):.1e}"
    return " | ".join(parts) + " | " + errs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    common.set_threads(args.threads)
    ops = compiled_ops()
    if ops is None:
        sys.exit("the kernel is not available on this machine (see the warning above)")
    print(f"# {machine()}")
    for dtype_name in args.dtype:
        for model in args.shapes:
            print(f"{model} {dtype_name} (speed-ups over aten)", flush=True)
            for shape in SHAPES[model]:
                print("  " + run_shape(shape, DTYPES[dtype_name], args.rounds, ops), flush=True)
    print(f"# {machine()}")


if __name__ == "__main__":
    main()
