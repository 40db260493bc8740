"""Image variation: same folder (lambdalabs layout), same seed, same image as diffusers; inputs; errors; CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import SD1_SCHEDULER, SD1_UNET, VAE, max_diff, safety_components

import stablepipe

TOLERANCE = 2e-3


def image_encoder_and_processor(seed: int = 0):
    """A tiny CLIPVisionModelWithProjection (32 px, projection 32 = the UNet's cross-attention width) and its
    CLIPImageProcessor, as in lambdalabs/sd-image-variations-diffusers (224 px there)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=4,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def write_variation_folder(folder: Path, *, safety: bool = True, seed: int = 0) -> Path:
    """Save a tiny diffusers StableDiffusionImageVariationPipeline (feature_extractor, image_encoder,
    safety_checker, scheduler, unet, vae) to `folder`."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**SD1_UNET)
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**VAE)
    image_encoder, processor = image_encoder_and_processor(seed + 2)
    checker = safety_components(seed + 3)[0] if safety else None
    scheduler = diffusers.PNDMScheduler(**SD1_SCHEDULER, skip_prk_steps=True)
    pipe = diffusers.StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        safety_checker=checker, feature_extractor=processor, requires_safety_checker=safety,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def variation_folder(tmp_path_factory) -> Path:
    return write_variation_folder(tmp_path_factory.mktemp("variation"))


def input_image(seed: int, size: tuple[int, int] = (40, 48)) -> PIL.Image.Image:
    """A smooth random RGB picture (not square, so the processor's resize and crop both matter)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize(size, PIL.Image.BILINEAR)


def load_both(folder):
    import diffusers

    ours = stablepipe.StableDiffusionImageVariationPipeline.from_pretrained(folder)
    theirs = diffusers.StableDiffusionImageVariationPipeline.from_pretrained(folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def loaded(variation_folder):
    """Both pipelines, loaded once for the module (tests that swap the scheduler use `pipes`)."""
    return load_both(variation_folder)


def pipes(loaded, scheduler: str = "PNDMScheduler"):
    """The loaded pair with a fresh scheduler of the given class (from the folder's scheduler config)."""
    import diffusers

    ours, theirs = loaded
    ours.scheduler = getattr(stablepipe, scheduler).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    return ours, theirs


def run_both(ours, theirs, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np", **kwargs}
    a = ours(generator=torch.Generator().manual_seed(seed), **kwargs)
    b = theirs(generator=torch.Generator().manual_seed(seed), **kwargs)
    assert a.images.shape == b.images.shape
    assert a.nsfw_content_detected == b.nsfw_content_detected
    return max_diff(a.images, b.images), a.images


CASES = {
    "pndm-guided": dict(scheduler="PNDMScheduler", call=dict(image=input_image(0), guidance_scale=7.5)),
    "pndm-unguided": dict(scheduler="PNDMScheduler", call=dict(image=input_image(0), guidance_scale=1.0)),
    "ddim-eta": dict(scheduler="DDIMScheduler", call=dict(image=input_image(1), guidance_scale=3.0, eta=0.5)),
    "euler-batch": dict(
        scheduler="EulerDiscreteScheduler",
        call=dict(image=[input_image(2), input_image(3)], num_images_per_prompt=2, guidance_scale=5.0),
    ),
    "euler-nonsquare": dict(scheduler="EulerDiscreteScheduler", call=dict(image=input_image(4), height=48, width=32)),
}


@pytest.mark.parametrize("case", CASES)
def test_variation_matches_diffusers(loaded, case):
    spec = CASES[case]
    ours, theirs = pipes(loaded, spec["scheduler"])
    diff, images = run_both(ours, theirs, **spec["call"])
    print(f"{case}: max abs diff {diff:.2e}")
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    assert images.std() > 0.01  # a real picture, not a constant


def test_batch_order_and_input_image_matters(loaded):
    ours, _ = pipes(loaded)
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=5.0)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pair = ours([input_image(2), input_image(3)], generator=generators, **common)
    second = ours(input_image(3), generator=torch.Generator().manual_seed(6), **common)
    other = ours(input_image(2), generator=torch.Generator().manual_seed(6), **common)
    assert max_diff(pair.images[1], second.images[0]) < 1e-5  # image 2 of the batch: the second input, seed 6
    assert max_diff(other.images[0], second.images[0]) > 1e-3  # another input image, another picture


def test_tensor_input_is_clip_pixel_values(loaded):
    ours, _ = pipes(loaded)
    picture = input_image(7)
    pixels = ours.feature_extractor(images=picture, return_tensors="pt").pixel_values
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    from_pil = ours(picture, generator=torch.Generator().manual_seed(0), **common).images
    from_tensor = ours(pixels, generator=torch.Generator().manual_seed(0), **common).images
    from_chw = ours(pixels[0], generator=torch.Generator().manual_seed(0), **common).images
    assert max_diff(from_pil, from_tensor) == 0.0 and max_diff(from_pil, from_chw) == 0.0


def test_image_embeddings_match_diffusers(loaded):
    ours, theirs = pipes(loaded)
    embeds, negative = ours.encode_image([input_image(0), input_image(1)], torch.device("cpu"), 2, True)
    reference = theirs._encode_image([input_image(0), input_image(1)], torch.device("cpu"), 2, True)
    assert embeds.shape == (4, 1, 32) and torch.count_nonzero(negative) == 0
    assert torch.allclose(torch.cat([negative, embeds]), reference, atol=1e-6)


def test_components_and_save_round_trip(loaded, tmp_path):
    import diffusers

    ours, _ = pipes(loaded)
    assert set(ours.components) == {"vae", "image_encoder", "unet", "scheduler", "safety_checker", "feature_extractor"}
    again = stablepipe.StableDiffusionImageVariationPipeline(**ours.components)
    assert again.unet is ours.unet and again.image_encoder is ours.image_encoder
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionImageVariationPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    theirs = diffusers.StableDiffusionImageVariationPipeline.from_pretrained(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    diff, _ = run_both(ours, theirs, image=input_image(0), num_inference_steps=2)
    assert diff < TOLERANCE


def test_crafted_concept_flags_and_blacks_out_like_diffusers(variation_folder):
    """Put the first output's own CLIP embedding among the checker's concepts: both libraries flag it only."""
    from stablepipe.image import numpy_to_pil

    ours, theirs = load_both(variation_folder)
    call = dict(image=[input_image(0), input_image(5)], num_inference_steps=2, height=32, width=32, output_type="np")
    before = ours(generator=torch.Generator().manual_seed(0), **call)
    clip = ours.feature_extractor(numpy_to_pil(before.images), return_tensors="pt").pixel_values
    embeds = ours.safety_checker.embed_images(clip)  # (2, P)
    similarity = torch.nn.functional.cosine_similarity(embeds[0], embeds[1], dim=0).item()
    threshold = round((1 + similarity) / 2, 3)
    assert similarity < threshold - 0.001 < 1
    for checker in (ours.safety_checker, theirs.safety_checker):
        checker.concept_embeds.data[2] = embeds[0]
        checker.concept_embeds_weights.data[2] = threshold
    diff, images = run_both(ours, theirs, **call)  # compares the flags too
    assert np.count_nonzero(images[0]) == 0 and max_diff(images[1], before.images[1]) < 1e-6
    assert diff < TOLERANCE


def test_legacy_callback_matches_diffusers_and_latent_output(loaded):
    ours, theirs = pipes(loaded)
    seen: dict[str, list] = {"ours": [], "theirs": []}
    for name, pipe in (("ours", ours), ("theirs", theirs)):
        pipe(input_image(0), num_inference_steps=3, height=32, width=32, output_type="np", callback_steps=2,
             generator=torch.Generator().manual_seed(0),
             callback=lambda step, t, latents, log=seen[name]: log.append((step, int(t), latents.clone())))
    assert [s[:2] for s in seen["ours"]] == [s[:2] for s in seen["theirs"]] and seen["ours"]
    assert max_diff(seen["ours"][-1][2], seen["theirs"][-1][2]) < 1e-4
    out = ours(input_image(0), num_inference_steps=1, height=32, width=32, output_type="latent")
    assert out.images.shape == (1, 4, 16, 16) and out.nsfw_content_detected is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(image="photo.png"), TypeError, "must be a PIL image"),
        (dict(image=[]), TypeError, "must be a PIL image"),
        (dict(image=torch.zeros(1, 3, 16, 16)), ValueError, r"CLIP pixel values of shape \(B, 3, 32, 32\)"),
        (dict(height=36), ValueError, "height must be a positive multiple of 8"),
        (dict(callback_steps=0), ValueError, "callback_steps must be a positive integer"),
        (dict(generator=[torch.Generator()] * 3), ValueError, "3 generators"),
        (dict(prompt="a cat"), TypeError, r"unknown arguments \['prompt'\]"),
    ],
)
def test_bad_input_is_a_clear_error(loaded, kwargs, error, message):
    ours, _ = pipes(loaded)
    with pytest.raises(error, match=message):
        ours(**{"image": input_image(0), "num_inference_steps": 1, "height": 32, "width": 32, **kwargs})


def test_missing_feature_extractor_for_pil_input(loaded):
    ours, _ = pipes(loaded)
    bare = stablepipe.StableDiffusionImageVariationPipeline(
        **{**ours.components, "safety_checker": None, "feature_extractor": None}, requires_safety_checker=False
    )
    with pytest.raises(ValueError, match="no feature_extractor"):
        bare(input_image(0), num_inference_steps=1, height=32, width=32)


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_variation_writes_pngs(variation_folder, loaded, tmp_path, capsys):
    from stablepipe.cli import main

    source = tmp_path / "source.png"
    input_image(0, size=(64, 64)).save(source)
    argv = ["variation", str(source), "--model", str(variation_folder), "--dtype", "float32", "--steps", "2",
            "--seed", "5", "--num-images", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "out"),
            "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["seed"] for f in report["files"]] == [5, 6]
    assert report["settings"]["image"] == str(source)
    written = [np.asarray(PIL.Image.open(f["path"])) for f in report["files"]]
    assert written[0].shape == (32, 32, 3)
    ours, _ = pipes(loaded)
    expected = ours(PIL.Image.open(source).convert("RGB"), num_inference_steps=2, width=32, height=32,
                    generator=torch.Generator().manual_seed(6)).images[0]
    assert np.array_equal(written[1], np.asarray(expected))  # the second file is the seed-6 image


def test_cli_variation_errors(variation_folder, tmp_path, capsys):
    from stablepipe.cli import main

    assert main(["variation", str(tmp_path / "missing.png"), "--model", str(variation_folder)]) == 2
    assert "missing.png" in capsys.readouterr().err
    text_model = tmp_path / "text-only"
    from conftest import write_sd_folder

    write_sd_folder(text_model)
    source = tmp_path / "source.png"
    input_image(0).save(source)
    assert main(["variation", str(source), "--model", str(text_model), "--steps", "1"]) == 2
    assert "image_encoder" in capsys.readouterr().err


def test_cli_variation_builtin_model(tmp_path, monkeypatch, capsys):
    from stablepipe.cli import main

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "source.png"
    input_image(0).convert("L").save(source)  # gray: the command makes it RGB
    out = tmp_path / "v.png"
    assert main(["variation", str(source), "--steps", "1", "--seed", "1", "--out", str(out)]) == 0
    assert "built-in tiny variation model" in capsys.readouterr().err
    assert (tmp_path / "cache" / "builtin-tiny-variation-v1" / "image_encoder" / "config.json").is_file()
    settings = json.loads(PIL.Image.open(out).text["stablepipe"])
    assert settings["command"] == "variation" and settings["image"] == str(source) and settings["seed"] == 1
