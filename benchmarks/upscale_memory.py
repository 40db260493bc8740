"""Peak memory of the x4 upscaler, untiled against tiled (UNet tiles + the VAE's tiled decode).

    python benchmarks/upscale_memory.py --sizes 128 256 512 --tile 128 --overlap 32     # seconds, any machine
    python benchmarks/upscale_memory.py --sizes 512 --tile 128 --device cuda            # a real run on a GPU

The models have the real stabilityai/stable-diffusion-x4-upscaler architecture (UNet 473M parameters, 3-level
VAE; the configs stablepipe ships for single-file loading) with random weights, so nothing is downloaded.

Default (`--device meta`): the two memory-heavy stages, one guided UNet step (batch 2) and the VAE decode, run on
PyTorch's meta device (shapes only, no arithmetic) while a dispatch mode counts the bytes of the tensors alive at
each moment: the peak is the activation memory the stage needs on top of the weights, in float32, independent
of the allocator, with attention counted as torch's memory-efficient kernel runs it (no N x N matrix).
(Resident-memory measurements on the 2-core CPU VM proved unreliable: the kernel's high-water mark missed peaks.)
`--device cuda`: the whole pipeline for real, one step, peak `torch.cuda.max_memory_allocated` above the memory
held before the call.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors created inside the block while they are alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def forget(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None and id(t) not in self.tracked:  # new storage
                nbytes = t.untyped_storage().nbytes()
                self.tracked.add(id(t))
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self.forget, id(t), nbytes)
        return out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """The memory-efficient attention kernel (no N x N matrix), as torch runs float32 attention on CPU and CUDA;
    on the meta device plain `scaled_dot_product_attention` would count the math fallback's full matrix."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


def build_models(device: str):
    from stablepipe import AutoencoderKL, UNet2DConditionModel
    from stablepipe.loading.model_detection import type_config

    parts = type_config("sd-x4-upscaler")["components"]
    with torch.device(device):
        unet = UNet2DConditionModel(**parts["unet"]["config"]).eval()
        vae = AutoencoderKL(**parts["vae"]["config"]).eval()
    return unet, vae, parts


def measure_meta(size: int, tile: int | None, overlap: int | None) -> dict:
    """Peak live activation memory (MiB) of one guided UNet step and of the decode, for a size x size input."""
    from stablepipe.pipelines.upscale import TiledUNet, TileSpec, vae_tiling

    unet, vae, _ = build_models("meta")
    torch.nn.functional.scaled_dot_product_attention = flash_attention  # this process only measures
    spec = TileSpec(tile, overlap) if tile else None
    network = TiledUNet(unet, spec) if spec else unet
    sample = torch.zeros(2, 7, size, size, device="meta")  # (uncond, cond) x (4 latent + 3 image channels)
    context, labels = torch.zeros(2, 77, 1024, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    with torch.no_grad(), LiveTensorBytes() as step:
        network(sample, 500, encoder_hidden_states=context, class_labels=labels, return_dict=False)
    with torch.no_grad(), vae_tiling(vae, spec), LiveTensorBytes() as decode:
        vae.decode(torch.zeros(1, 4, size, size, device="meta"))
    return {"unet": step.peak / MIB, "decode": decode.peak / MIB}


def measure_cuda(size: int, tile: int | None, overlap: int | None) -> dict:
    """The whole pipeline, one step, for real on the GPU: peak allocated memory above the loaded models (MiB)."""
    from stablepipe import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    unet, vae, parts = build_models("cpu")
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        low_res_scheduler=DDPMScheduler(**parts["low_res_scheduler"]["config"]),
        scheduler=DDIMScheduler(**parts["scheduler"]["config"]),
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(2, 1, 77, 1024, device="cuda")
    image = torch.rand(1, 3, size, size)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        pipe(image=image, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=1,
             tile_size=tile, tile_overlap=overlap, output_type="pt")  # fmt: skip
    return {"pipeline": (torch.cuda.max_memory_allocated() - baseline) / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="low-res input sides (px)")
    parser.add_argument("--tile", type=int, default=128, help="tile side in low-res pixels")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--device", default="meta", choices=["meta", "cuda"])
    args = parser.parse_args()
    measure = measure_meta if args.device == "meta" else measure_cuda
    print(f"x4 upscaler, real architecture, float32, guidance on; peak MiB above the weights ({args.device})")
    print("| input | output | mode | " + (" | ".join(["UNet step", "VAE decode"]) if args.device == "meta"
                                          else "pipeline") + " |")  # fmt: skip
    for size in args.sizes:
        for tile in (None, args.tile):
            r = measure(size, tile, args.overlap if tile else None)
            mode = "untiled" if tile is None else f"tile_size={tile}, tile_overlap={args.overlap}"
            cells = " | ".join(f"{v:,.0f}" for v in r.values())
            print(f"| {size}x{size} | {4 * size}x{4 * size} | {mode} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
