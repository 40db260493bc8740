"""Measure how well a model follows captions, with the non-learned checker of shapes_data.py.

    python training/evaluate.py training/runs/demo/step001000 [--steps 20] [--guidance 7.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import shapes_data  # noqa: E402

ATTRIBUTES = ("colour", "shape", "position", "background", "size")
FOLLOWED = ("colour", "shape", "position", "background")  # what counts for adherence


def generate(pipe, scenes, *, steps: int, guidance: float, seed: int = 0, guidance_rescale: float = 0.0) -> np.ndarray:
    """One picture per scene, scene i with seed `seed + i`: (N, H, W, 3) in [0, 1]."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(scenes))]
    out = pipe([s.caption for s in scenes], num_inference_steps=steps, guidance_scale=guidance,
               guidance_rescale=guidance_rescale, generator=generators, output_type="np")
    return out.images


def adherence(images: np.ndarray, scenes) -> dict[str, float]:
    """The fraction of pictures following each attribute, and `all`: colour, shape, position and background."""
    checks = [shapes_data.check_picture(image, scene) for image, scene in zip(images, scenes, strict=True)]
    scores = {key: float(np.mean([c[key] for c in checks])) for key in ATTRIBUTES}
    scores["all"] = float(np.mean([all(c[k] for k in FOLLOWED) for c in checks]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.0)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="save the pictures side by side here")
    args = parser.parse_args()
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scenes = shapes_data.benchmark_scenes(args.count)
    images = generate(pipe, scenes, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      guidance_rescale=args.guidance_rescale)
    print(args.model, adherence(images, scenes))
    if args.grid:
        from PIL import Image

        rows = [np.concatenate(list(images[i : i + 8]), axis=1) for i in range(0, len(images), 8)]
        Image.fromarray((np.concatenate(rows) * 255).round().astype(np.uint8)).resize((8 * 96, len(rows) * 96), 0).save(
            args.grid
        )


if __name__ == "__main__":
    main()
