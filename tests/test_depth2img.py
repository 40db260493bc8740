"""Depth-to-image: a tiny 5-channel UNet with a tiny random DPT matches diffusers (depth from DPT and from
depth_map, batches, strength, schedulers); depth inputs; saving; errors; CLI."""

from __future__ import annotations

import json

import fixtures_image
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff
from fixtures_image import TOLERANCE, load_both, run_both, sample_image, seeded

import stablepipe

depth_folder = fixtures_image.depth_folder  # session fixture
DEPTH = "StableDiffusionDepth2ImgPipeline"
IMAGE = sample_image()
DEPTH_MAP = torch.rand(1, 20, 24, generator=torch.Generator().manual_seed(0))  # (B, H, W), any size

CASES = {
    "ddim-dpt": dict(scheduler=None, call=dict(prompt="a cat", image=IMAGE, strength=0.75, eta=0.5)),
    "euler-dpt-batch": dict(
        scheduler="EulerDiscreteScheduler",
        call=dict(prompt=["a cat", "a dog"], image=[IMAGE, sample_image(seed=1)], num_images_per_prompt=2,
                  strength=0.8, num_inference_steps=4),
    ),
    "ancestral-dpt-not-square": dict(
        scheduler="EulerAncestralDiscreteScheduler",
        call=dict(prompt="x", image=sample_image(48, 40), strength=1.0, negative_prompt="blur"),
    ),
    "lms-depth-map": dict(scheduler="LMSDiscreteScheduler", call=dict(prompt="x", image=IMAGE, depth_map=DEPTH_MAP)),
    "generators-depth-map-unguided": dict(
        scheduler=None,
        call=dict(prompt="x", image=IMAGE, depth_map=DEPTH_MAP, num_images_per_prompt=2, guidance_scale=1.0,
                  seed=[3, 4]),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers(depth_folder, case):
    spec = CASES[case]
    ours, theirs = load_both(DEPTH, depth_folder, spec["scheduler"])
    call = dict(spec["call"])
    diff, images = run_both(ours, theirs, seed=call.pop("seed", 0), **call)
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    assert images.std() > 0.01


@pytest.fixture(scope="module")
def pipe(depth_folder):
    p = stablepipe.StableDiffusionDepth2ImgPipeline.from_pretrained(depth_folder)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, **kwargs):
    kwargs = {"prompt": "x", "image": IMAGE, "num_inference_steps": 2, "output_type": "np", "generator": seeded(0),
              **kwargs}
    return pipe(**kwargs).images


def test_depth_map_inputs_and_their_effect(pipe):
    """The same depth as a tensor, an array, (B, 1, H, W) or a 16-bit PNG gives the same image; another
    depth gives another image; the scale of a depth map does not matter (it is normalized)."""
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))  # (H, W), far left, near right
    reference = run(pipe, depth_map=torch.from_numpy(ramp)[None])
    assert max_diff(run(pipe, depth_map=ramp), reference) == 0
    assert max_diff(run(pipe, depth_map=torch.from_numpy(ramp * 1000 + 5)[None, None]), reference) < 1e-5
    sixteen = PIL.Image.fromarray((ramp * 65535).round().astype(np.uint16))
    assert max_diff(run(pipe, depth_map=sixteen), reference) < 1e-4
    assert max_diff(run(pipe, depth_map=ramp[:, ::-1].copy()), reference) > 1e-3
    flat = run(pipe, depth_map=np.ones((8, 8), dtype=np.float32))  # no depth at all: -1 everywhere, not NaN
    assert np.isfinite(flat).all()


def test_tensor_images_get_the_dpt_scale_right(pipe):
    """A [0, 1] tensor and the PIL image it came from see the same depth (diffusers rescales
    tensors a second time, which flattens their depth)."""
    tensor = torch.from_numpy(np.asarray(IMAGE) / 255.0).permute(2, 0, 1)[None].float()
    assert max_diff(run(pipe, image=tensor), run(pipe)) < 1e-4


def test_without_depth_estimator_a_depth_map_is_needed(pipe, sd1_folder):
    bare = stablepipe.StableDiffusionDepth2ImgPipeline(
        **{**pipe.components, "depth_estimator": None, "feature_extractor": None}
    )
    bare.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="pass `depth_map=`.*stabilityai/stable-diffusion-2-depth"):
        run(bare)
    assert max_diff(run(bare, depth_map=DEPTH_MAP), run(pipe, depth_map=DEPTH_MAP)) == 0
    text2img = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    with pytest.raises(ValueError, match="text-to-image UNet.*stabilityai/stable-diffusion-2-depth"):
        stablepipe.StableDiffusionDepth2ImgPipeline(**text2img.components)


def test_saved_folder_loads_in_diffusers(pipe, tmp_path):
    import diffusers

    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["depth_estimator"] == ["transformers", "DPTForDepthEstimation"] and "safety_checker" not in index
    theirs = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    diff, _ = run_both(pipe, theirs, prompt="x", image=IMAGE, num_inference_steps=2)
    assert diff < TOLERANCE
    images = pipe(prompt="x", image=IMAGE, num_inference_steps=2, return_dict=False)
    assert isinstance(images, tuple) and len(images) == 1 and isinstance(images[0][0], PIL.Image.Image)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=-1), r"strength must be a number in \[0, 1\]"),
        (dict(strength=0.4, num_inference_steps=2), "leaves no denoising step"),
        (dict(image=None), "no image given"),
        (dict(image=torch.zeros(1, 4, 16, 16)), "pass `depth_map=` too"),
        (dict(depth_map=torch.zeros(1, 3, 8, 8)), "must have one channel"),
        (dict(depth_map="depth.png"), "depth_map must be a tensor, array or PIL image"),
        (dict(depth_map=torch.rand(3, 8, 8)), "got 3 depth maps for a batch of 1"),
        (dict(timesteps=[999, 500]), r"unknown arguments \['timesteps'\]"),
        (dict(callback_on_step_end_tensor_inputs=["mask"]), "not available"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        run(pipe, **kwargs)


def test_callback_sees_and_replaces_the_depth(pipe):
    def flatten(p, i, t, tensors):
        assert tensors["depth_mask"].shape == (2, 1, 16, 16)
        return {"depth_mask": torch.zeros_like(tensors["depth_mask"])}

    changed = run(pipe, callback_on_step_end=flatten, callback_on_step_end_tensor_inputs=["latents", "depth_mask"],
                  num_inference_steps=4, strength=1.0)
    assert max_diff(changed, run(pipe, num_inference_steps=4, strength=1.0)) > 1e-4


def test_cli_depth2img(depth_folder, tmp_path, capsys):
    from stablepipe.cli import main

    source, depth = tmp_path / "in.png", tmp_path / "depth.png"
    sample_image(40, 24).save(source)
    PIL.Image.fromarray(np.tile(np.arange(40, dtype=np.uint16) * 1000, (24, 1))).save(depth)
    out = tmp_path / "out.png"
    args = ["depth2img", "a boat", "--image", str(source), "--steps", "2", "--seed", "1", "--quiet"]
    assert main([*args, "--model", str(depth_folder), "--depth-map", str(depth), "--out", str(out)]) == 0
    result = PIL.Image.open(out)
    assert result.size == (40, 24) and json.loads(result.text["stablepipe"])["depth_map"] == str(depth)
    assert main([*args, "--out", str(tmp_path / "no-depth-model.png")]) == 2
    assert "pass --model stabilityai/stable-diffusion-2-depth" in capsys.readouterr().err
