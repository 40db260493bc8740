"""The shipped demo model follows its captions, measured by the non-learned checker of training/shapes_data.py.

The checker reads each picture without learning: the background is the median colour away from the asked-for
quadrant, the shape's pixels are those far from it, its colour is their median (nearest named colour), its position
the quadrant of their centroid, and its shape the drawing (circle, square, triangle) that overlaps it best.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import evaluate  # noqa: E402
import shapes_data  # noqa: E402

from stablepipe.builtin import DEMO_MODEL, builtin_model_path  # noqa: E402

STEPS = 20
GUIDANCE = 7.5  # the pipelines' default
ADHERENCE_THRESHOLD = 0.8  # colour, shape, position and background all right, over the fixed scenes and seeds
RANDOM_ADHERENCE = 0.25  # a model that ignored its prompt scores below this (see test_checker_rejects_wrong_scenes)

needs_demo_model = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="no demo model shipped")


@pytest.fixture(scope="module")
def pipe():
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def generated(pipe):
    scenes = shapes_data.benchmark_scenes()
    return scenes, evaluate.generate(pipe, scenes, steps=STEPS, guidance=GUIDANCE)


@needs_demo_model
def test_shipped_weights_are_small_float16():
    files = sorted(DEMO_MODEL.glob("*/*.safetensors"))
    assert [f.parent.name for f in files] == ["text_encoder", "unet", "vae"]
    assert sum(f.stat().st_size for f in DEMO_MODEL.rglob("*") if f.is_file()) < 16e6  # "a few MB": about 12
    from safetensors.torch import load_file

    assert {t.dtype for f in files for t in load_file(f).values()} == {torch.float16}


def test_checker_reads_drawn_scenes():
    rng = np.random.default_rng(0)
    scenes = shapes_data.benchmark_scenes()
    images = np.stack([np.clip(shapes_data.render(s, rng) + rng.normal(0, 0.03, (32, 32, 3)), 0, 1) for s in scenes])
    assert evaluate.adherence(images, scenes) == {k: 1.0 for k in (*evaluate.ATTRIBUTES, "all")}


def test_checker_rejects_wrong_scenes():
    """Each picture checked against the next scene's caption: a model that ignored its prompts would score this."""
    rng = np.random.default_rng(0)
    scenes = shapes_data.benchmark_scenes()
    images = np.stack([shapes_data.render(s, rng) for s in scenes])
    assert evaluate.adherence(images, scenes[1:] + scenes[:1])["all"] < RANDOM_ADHERENCE


@needs_demo_model
def test_text_to_image_follows_captions(generated):
    scenes, images = generated
    assert images.shape == (len(scenes), 32, 32, 3)
    scores = evaluate.adherence(images, scenes)
    assert scores["all"] >= ADHERENCE_THRESHOLD, scores


@needs_demo_model
def test_builtin_model_is_the_demo_model(tmp_path, monkeypatch, pipe):
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path))
    builtin = StableDiffusionPipeline.from_pretrained(builtin_model_path())  # no dtype: unpacked to float32
    assert builtin.unet.dtype == torch.float32 and builtin.vae.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(builtin.unet.parameters(), pipe.unet.parameters(), strict=True))


@needs_demo_model
def test_diffusers_loads_the_demo_model_and_draws_the_same_picture(pipe):
    import diffusers

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32,
                                                               safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    caption = shapes_data.Scene("red", "circle", "top left", "gray", "large").caption
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np")
    expected = theirs(caption, generator=torch.Generator().manual_seed(0), **kwargs).images
    ours = pipe(caption, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(ours - expected).max() < 1e-5


def test_builtin_model_without_demo_weights_is_the_random_model(tmp_path, monkeypatch):
    import stablepipe.builtin as builtin

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "DEMO_MODEL", tmp_path / "not-installed")
    assert builtin.builtin_model_path() == tmp_path / builtin.BUILTIN_NAME
    assert (tmp_path / builtin.BUILTIN_NAME / "unet" / "config.json").is_file()


@needs_demo_model
@pytest.mark.parametrize("seed", range(4))
def test_image_to_image_recolours_and_keeps_the_layout(pipe, seed):
    """From a red circle, "a green circle" at strength 0.7: the shape turns green and stays where it was."""
    from PIL import Image

    from stablepipe.pipelines.img2img import StableDiffusionImg2ImgPipeline

    before = shapes_data.render(shapes_data.Scene("red", "circle", "top left", "gray", "large"))  # (32, 32, 3)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    wanted = shapes_data.Scene("green", "circle", "top left", "gray", "large")
    after = img2img(
        wanted.caption, image=Image.fromarray((before * 255).round().astype(np.uint8)), strength=0.7,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]  # (32, 32, 3)
    found = shapes_data.read_picture(after, wanted.position)
    assert (found["colour"], found["position"], found["background"]) == ("green", "top left", "gray"), found


@needs_demo_model
@pytest.mark.parametrize("seed", range(2))
def test_inpainting_replaces_the_circle_and_nothing_else(pipe, seed):
    """The top-left quadrant, which holds a red circle, masked with "a green square ... top left": a green square
    comes there, and the rest of the picture stays as it was."""
    from PIL import Image

    from stablepipe.pipelines.inpaint import StableDiffusionInpaintPipeline

    before = shapes_data.render(shapes_data.Scene("red", "circle", "top left", "gray", "large"))  # (32, 32, 3)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16, :16] = 255  # repaint the top-left quadrant
    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    wanted = shapes_data.Scene("green", "square", "top left", "gray", "large")
    image = Image.fromarray((before * 255).round().astype(np.uint8))
    after = inpaint(
        wanted.caption, image=image, mask_image=Image.fromarray(mask),
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]  # (32, 32, 3)
    keep = np.ones((32, 32), dtype=bool)
    keep[:18, :18] = False  # the mask and a 2-pixel band around it, where latents blend
    assert np.abs(after - before)[keep].mean() < 0.03
    assert np.abs(after - before)[:16, :16].mean() > 0.1  # the masked quadrant did change
    found = shapes_data.read_picture(after, wanted.position)
    assert (found["colour"], found["shape"], found["position"]) == ("green", "square", "top left"), found
