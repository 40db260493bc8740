"""Time one forward of the full-size SD1.5 (or SDXL) UNet, stablepipe against diffusers, same weights, same run.

    python benchmarks/unet_forward.py --size 256 --batch 2 --dtype float32 bfloat16 --repeats 3

Random weights (nothing is downloaded): diffusers builds the model from the SD1.5 config, and stablepipe
loads the very same state dict. Prints seconds per forward (best of --repeats), GFLOP/s and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)


def count_flops(model: torch.nn.Module, *args, **kwargs) -> float:
    """Floating-point operations of one forward, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    return float(counter.get_total_flops())


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import diffusers

    from stablepipe import UNet2DConditionModel

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    ours = UNet2DConditionModel.from_state_dict(dict(theirs.config), theirs.state_dict())
    side = args.size // 8
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        theirs.to(dtype)
        ours.to(dtype)
        x = torch.randn(args.batch, 4, side, side, dtype=dtype)
        t = torch.tensor([500] * args.batch)
        text = torch.randn(args.batch, 77, 768, dtype=dtype)
        flops = count_flops(theirs, x, t, text)
        with torch.no_grad():
            diff = (ours(x, t, text).sample.float() - theirs(x, t, text).sample.float()).abs().max().item()
            t_ours = best_time(lambda: ours(x, t, text), args.repeats)
            t_theirs = best_time(lambda: theirs(x, t, text), args.repeats)
        print(
            f"{dtype_name:9s} {args.size}px batch {args.batch}: {flops / 1e9:.0f} GFLOP | "
            f"stablepipe {t_ours:.3f} s ({flops / t_ours / 1e9:.0f} GFLOP/s) | "
            f"diffusers {t_theirs:.3f} s ({flops / t_theirs / 1e9:.0f} GFLOP/s) | "
            f"speed-up x{t_theirs / t_ours:.2f} | max abs diff {diff:.2e}"
        )


if __name__ == "__main__":
    main()
