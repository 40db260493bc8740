"""VAE decode and text encoding of SD 1.5 at full size, stablepipe against diffusers: same weights, same run.

    python benchmarks/components.py --size 512 --dtype float32 bfloat16 --rounds 3 --threads 1

The VAE is diffusers' `AutoencoderKL` with the SD 1.5 config and random weights; stablepipe's takes the very same
tensors. Text encoding is the whole prompt stage (tokenize, CLIP ViT-L/14 text model with random weights, prompt
and negative prompt) through each library's `encode_prompt`, on one shared text encoder (transformers' model: the
same network in both, so this measures only what the libraries add around it). Variants with `+cl` keep the VAE
in channels-last format. Reported as unet_forward.py reports (paired rounds, FLOPs from FlopCounterMode).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import CLIP_L_TEXT, DTYPES, SD_VAE, count_flops, machine, paired  # noqa: E402


def vae_decode(args: argparse.Namespace, dtype: torch.dtype) -> None:
    import diffusers

    from stablepipe import AutoencoderKL

    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**SD_VAE).eval().to(dtype)
    ours = AutoencoderKL.from_state_dict(dict(theirs.config), theirs.state_dict())
    variants = {"diffusers": theirs, "stablepipe": ours}
    if args.channels_last:
        variants["diffusers+cl"] = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
        variants["stablepipe+cl"] = AutoencoderKL.from_state_dict(dict(theirs.config), dict(theirs.state_dict()))
        variants["stablepipe+cl"].to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    report(f"VAE decode {args.size}px", variants, lambda m: m.decode(z).sample, args.rounds, dtype)


def text_encoding(args: argparse.Namespace, dtype: torch.dtype) -> None:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablepipe import StableDiffusionPipeline

    folder = common.write_sd15_folder(args.folder)
    tokenizer = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).tokenizer
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids)).eval().to(dtype)
    parts = {"text_encoder": encoder, "tokenizer": tokenizer, "unet": None, "vae": None, "scheduler": None}
    theirs = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)  # fmt: skip
    ours = StableDiffusionPipeline.__new__(StableDiffusionPipeline)
    ours.register_modules(**parts)

    def encode(pipe):
        return pipe.encode_prompt("a photograph of an astronaut riding a horse", torch.device("cpu"), 1, True,
                                  negative_prompt="blurry")[0]  # fmt: skip

    report("text encoding (prompt + negative)", {"diffusers": theirs, "stablepipe": ours}, encode, args.rounds, dtype)


def report(title: str, variants: dict, call, rounds: int, dtype: torch.dtype) -> None:
    flops = count_flops(lambda: call(variants["diffusers"]))
    with torch.no_grad():
        reference = call(variants["diffusers"]).float()
        diffs = {n: (call(m).float() - reference).abs().max().item() for n, m in variants.items()}
        results = paired({n: (lambda m=m: call(m)) for n, m in variants.items()}, rounds)
    print(f"{title} {str(dtype).removeprefix('torch.')}: {flops / 1e9:.1f} GFLOP")
    for name, (seconds, speedup) in results.items():
        print(f"  {name:16s} {seconds:8.3f} s  {flops / seconds / 1e9:5.0f} GFLOP/s  x{speedup:.3f} vs diffusers  "
              f"max abs diff {diffs[name]:.1e}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--parts", nargs="+", default=["vae", "text"], choices=["vae", "text"])
    parser.add_argument("--channels-last", action="store_true", help="add channels-last variants of the VAE")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "stablepipe-bench-sd15",
                        help="where the SD 1.5 folder is (made if missing): its tokenizer is used")  # fmt: skip
    args = parser.parse_args()
    common.set_threads(args.threads)
    print(f"# {machine()}")
    for dtype_name in args.dtype:
        if "text" in args.parts:
            text_encoding(args, DTYPES[dtype_name])
        if "vae" in args.parts:
            vae_decode(args, DTYPES[dtype_name])


if __name__ == "__main__":
    main()
