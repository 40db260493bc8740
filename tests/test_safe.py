"""Safe Stable Diffusion (Safe Latent Diffusion): same folder, same seed, same image as diffusers, for each
preset, warmup, momentum and a user concept; the safety checker's flagged images; errors; `generate --safe`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_diff

import stablepipe
from stablepipe.image import numpy_to_pil
from stablepipe.pipelines.safe import DEFAULT_SAFETY_CONCEPT, SafeLatentDiffusion, SafetyConfig

TOLERANCE = 2e-3
SIZE = dict(height=32, width=32)


def diffusers_safe(folder):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated pipeline, and its checker class differs from the folder's
        return diffusers.StableDiffusionPipelineSafe.from_pretrained(folder)


@pytest.fixture(scope="module")
def safe_folder(sd1_safety_folder, tmp_path_factory) -> Path:
    """The tiny SD 1.x folder (with a safety checker) saved by diffusers' StableDiffusionPipelineSafe."""
    folder = tmp_path_factory.mktemp("safe")
    diffusers_safe(sd1_safety_folder).save_pretrained(folder)
    return folder


def load_both(folder):
    ours = stablepipe.StableDiffusionPipelineSafe.from_pretrained(folder)
    theirs = diffusers_safe(folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def loaded(safe_folder):
    return load_both(safe_folder)


def pipes(loaded, scheduler: str = "PNDMScheduler", concept: str = DEFAULT_SAFETY_CONCEPT):
    """The loaded pair with fresh schedulers of the given class and the given safety concept."""
    import diffusers

    ours, theirs = loaded
    ours.scheduler = getattr(stablepipe, scheduler).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    ours.safety_concept = theirs.safety_concept = concept
    return ours, theirs


def generate(pipe, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": 3, **SIZE, "output_type": "np", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


def short_warmup(level: str, warmup: int = 1) -> dict:
    return {**SafetyConfig.preset(level), "sld_warmup_steps": warmup}


CASES = {
    # name: (scheduler, call); 3 steps (PNDM: 4 timesteps) unless given
    "defaults": ("PNDMScheduler", dict(prompt="a red circle")),  # warmup 10: momentum only, never applied
    "weak-warmup1": ("PNDMScheduler", dict(prompt="a red circle", **short_warmup("WEAK"))),
    "medium-warmup1": ("PNDMScheduler", dict(prompt="a red circle", **short_warmup("MEDIUM"))),
    "strong-warmup1": ("DDIMScheduler", dict(prompt="a red circle", **short_warmup("STRONG"))),
    "max": ("PNDMScheduler", dict(prompt="a red circle", **SafetyConfig.MAX)),
    "medium-full-warmup": ("EulerDiscreteScheduler",
                           dict(prompt="a red circle", num_inference_steps=12, **SafetyConfig.MEDIUM)),
    "momentum-warmup2": ("PNDMScheduler", dict(prompt="the sea", sld_warmup_steps=2, sld_guidance_scale=5000,
                                               sld_threshold=1.0, sld_momentum_scale=0.5, sld_mom_beta=0.7)),
    "batch": ("EulerDiscreteScheduler", dict(prompt=["a red circle", "the sea"], negative_prompt=["blue", "fog"],
                                             num_images_per_prompt=2, **SafetyConfig.MAX)),
    "guidance-off": ("PNDMScheduler", dict(prompt="a red circle", guidance_scale=1.0, **SafetyConfig.MAX)),
}


PLAIN: dict[str, np.ndarray] = {}


def plain_images(ours, scheduler: str, call: dict) -> np.ndarray:
    """The same generation without safety guidance (computed once per scheduler and non-SLD arguments)."""
    key = repr((scheduler, sorted((k, v) for k, v in call.items() if not k.startswith("sld_"))))
    if key not in PLAIN:
        PLAIN[key] = generate(ours, **{**call, "sld_guidance_scale": 0}).images
    return PLAIN[key]


@pytest.mark.parametrize("case", CASES)
def test_safe_matches_diffusers(loaded, case):
    scheduler, call = CASES[case]
    ours, theirs = pipes(loaded, scheduler)
    a, b = generate(ours, **call), generate(theirs, **call)
    diff = max_diff(a.images, b.images)
    effect = max_diff(a.images, plain_images(ours, scheduler, call))
    print(f"{case}: max abs diff {diff:.2e}, SLD changes the image by {effect:.2e}")
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    assert a.nsfw_content_detected == b.nsfw_content_detected
    assert a.applied_safety_concept == b.applied_safety_concept
    if case in ("defaults", "guidance-off"):
        assert effect < 1e-5  # warmup never ends within 4 timesteps / no guidance: the plain image
    else:
        assert effect > max(10 * diff, 1e-4)  # SLD did something, and diffusers did the same thing


def test_presets_are_diffusers_and_the_papers():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig as Reference

    for level in SafetyConfig.LEVELS:
        assert dict(getattr(SafetyConfig, level)) == getattr(Reference, level)
        assert SafetyConfig.preset(level.lower()) is getattr(SafetyConfig, level)
    from stablepipe.cli.generate import SAFETY_LEVELS

    assert SAFETY_LEVELS == SafetyConfig.LEVELS  # `generate --safe LEVEL` offers every preset
    with pytest.raises(TypeError):
        SafetyConfig.MAX["sld_guidance_scale"] = 1  # presets are read-only
    with pytest.raises(ValueError, match="unknown safety level 'EXTREME'; choose one of WEAK, MEDIUM, STRONG, MAX"):
        SafetyConfig.preset("EXTREME")


def test_warmup_switches_safety_guidance_on_at_that_step(loaded):
    ours, _ = pipes(loaded)
    common = dict(prompt="a red circle", sld_guidance_scale=5000, sld_threshold=1.0, sld_momentum_scale=0.0)
    plain = generate(ours, **common, sld_warmup_steps=4).images  # PNDM: 4 timesteps, so never applied
    reference = generate(ours, prompt="a red circle", sld_guidance_scale=0).images
    last_only = generate(ours, **common, sld_warmup_steps=3).images
    from_start = generate(ours, **common, sld_warmup_steps=0).images
    assert max_diff(plain, reference) < 1e-5
    assert max_diff(last_only, plain) > 1e-4 and max_diff(from_start, last_only) > 1e-4


def test_guide_follows_the_equations():
    """SafeLatentDiffusion on hand-made predictions (Schramowski et al. 2023, Eqs. 3-8)."""
    uncond, cond = torch.zeros(1, 1, 1, 3), torch.tensor([0.5, 0.5, 0.5]).view(1, 1, 1, 3)
    concept = torch.tensor([0.5, 0.5 - 2**-11, 2.0]).view(1, 1, 1, 3)  # cond - concept: 0, 2^-11, -1.5
    guide = SafeLatentDiffusion(7.5, sld_guidance_scale=1024, sld_warmup_steps=1, sld_threshold=0.01,
                                sld_momentum_scale=0.5, sld_mom_beta=0.4)
    noise = torch.cat([uncond, cond, concept])
    during_warmup = guide(0, torch.tensor(999), noise)
    assert torch.allclose(during_warmup, 7.5 * cond)  # plain guidance, momentum builds up
    # Eq. 6: scale = min(|cond - concept| * 1024, 1) where cond - concept < threshold: [0, 0.5, 1]
    gamma0 = torch.tensor([0.0, 0.5 * (0.5 - 2**-11), 2.0])  # Eq. 4: (concept - uncond) * scale
    assert torch.allclose(guide.momentum.flatten(), 0.6 * gamma0)  # Eq. 8 from zero momentum
    after = guide(1, torch.tensor(500), noise)
    gamma1 = gamma0 + 0.5 * 0.6 * gamma0  # Eq. 7
    assert torch.allclose(after.flatten(), 7.5 * (cond.flatten() - gamma1))  # Eq. 3


def test_user_concept(loaded):
    ours, theirs = pipes(loaded, concept="a blue square")
    call = dict(prompt="a red circle", **SafetyConfig.MAX)
    a, b = generate(ours, **call), generate(theirs, **call)
    assert a.applied_safety_concept == "a blue square" == b.applied_safety_concept
    assert max_diff(a.images, b.images) < TOLERANCE
    ours.safety_concept = DEFAULT_SAFETY_CONCEPT
    assert max_diff(a.images, generate(ours, **call).images) > 1e-3  # another concept, another image


def test_outputs_without_safety_guidance(loaded):
    ours, _ = pipes(loaded)
    with pytest.warns(UserWarning, match="Safe latent diffusion is off"):
        out = ours("a", num_inference_steps=1, **SIZE, output_type="np", sld_guidance_scale=1)
    assert out.applied_safety_concept is None and out.unsafe_images is None and out.nsfw_content_detected == [False]
    images, flags, concept, unsafe = generate(ours, prompt="a", num_inference_steps=1, return_dict=False)
    assert images.shape == (1, 32, 32, 3) and flags == [False] and concept == DEFAULT_SAFETY_CONCEPT and unsafe is None


def test_prompt_embeds_input_matches_prompt(loaded):
    ours, _ = pipes(loaded)
    embeds, negative = ours.encode_prompt("a dog", torch.device("cpu"), 1, True, negative_prompt="cat")
    call = dict(negative_prompt="cat", **SafetyConfig.MAX)
    a = generate(ours, prompt="a dog", **call).images
    b = generate(ours, prompt_embeds=embeds, negative_prompt_embeds=negative, **SafetyConfig.MAX).images
    assert max_diff(a, b) < 1e-6


def test_crafted_concept_flags_blacks_out_and_returns_the_unsafe_image(safe_folder):
    """Put the first image's own CLIP embedding among the checker's concepts: that image (only) is flagged,
    comes back black, and is returned in `unsafe_images`, as diffusers does."""
    ours, theirs = load_both(safe_folder)
    call = dict(prompt=["a red circle", "the sea"], num_inference_steps=2, **SafetyConfig.MAX)
    before = generate(ours, **call)
    assert before.nsfw_content_detected == [False, False] and before.unsafe_images is None
    clip = ours.feature_extractor(numpy_to_pil(before.images), return_tensors="pt").pixel_values
    embeds = ours.safety_checker.embed_images(clip)  # (2, P)
    similarity = torch.nn.functional.cosine_similarity(embeds[0], embeds[1], dim=0).item()
    threshold = round((1 + similarity) / 2, 3)
    assert similarity < threshold - 0.001 < 1  # the second image stays below the threshold
    for checker in (ours.safety_checker, theirs.safety_checker):
        checker.concept_embeds.data[5] = embeds[0]
        checker.concept_embeds_weights.data[5] = threshold
    a, b = generate(ours, **call), generate(theirs, **call)
    # diffusers' safe pipeline reuses the flags' name as its loop variable and returns only the last flag
    # (here False) once anything was flagged; its black images and `unsafe_images` show the flags.
    assert a.nsfw_content_detected == [True, False]
    assert np.count_nonzero(b.images[0]) == 0 and np.count_nonzero(b.unsafe_images[1]) == 0
    assert np.count_nonzero(a.images[0]) == 0 and max_diff(a.images[1], before.images[1]) < 1e-6
    assert a.unsafe_images.shape == (1, 32, 32, 3) and max_diff(a.unsafe_images[0], before.images[0]) < 1e-6
    assert max_diff(a.images, b.images) < TOLERANCE and max_diff(a.unsafe_images[0], b.unsafe_images[0]) < TOLERANCE
    pil = generate(ours, **call, output_type="pil")
    assert len(pil.unsafe_images) == 1 and np.asarray(pil.images[0]).max() == 0
    assert np.array_equal(np.asarray(pil.unsafe_images[0]), np.asarray(numpy_to_pil(before.images[:1])[0]))


def test_components_shared_with_text_to_image(sd1_safety_folder):
    text = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_safety_folder)
    safe = stablepipe.StableDiffusionPipelineSafe(**text.components)
    assert safe.unet is text.unet and safe.safety_checker is text.safety_checker and safe.image_encoder is None
    assert safe.safety_concept == DEFAULT_SAFETY_CONCEPT


def test_saved_folder_loads_in_diffusers(loaded, tmp_path):
    ours, _ = pipes(loaded)
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipelineSafe" and index["image_encoder"] == [None, None]
    theirs = diffusers_safe(tmp_path / "saved")
    theirs.set_progress_bar_config(disable=True)
    call = dict(prompt="x", num_inference_steps=1, **SafetyConfig.MAX)
    assert max_diff(generate(ours, **call).images, generate(theirs, **call).images) < TOLERANCE


def test_loads_the_aiml_tuda_layout(safe_folder, tmp_path):
    import shutil

    folder = shutil.copytree(safe_folder, tmp_path / "tuda")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion_safe", "SafeStableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = stablepipe.StableDiffusionPipelineSafe.from_pretrained(folder)
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(sld_warmup_steps=-1), ValueError, "sld_warmup_steps must be an integer >= 0"),
        (dict(sld_warmup_steps=2.5), ValueError, "sld_warmup_steps must be an integer >= 0"),
        (dict(sld_mom_beta=1.5), ValueError, r"sld_mom_beta .* in \[0, 1\]"),
        (dict(sld_threshold="high"), TypeError, "sld_threshold must be a number"),
        (dict(callback_steps=0), ValueError, "callback_steps must be a positive integer"),
        (dict(height=36), ValueError, "height must be a positive multiple of 8"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "got 1 negative prompts for 2 prompts"),
        (dict(prompt_3=object()), TypeError, r"unknown arguments \['prompt_3'\]"),
    ],
)
def test_bad_input_is_a_clear_error(loaded, kwargs, error, message):
    ours, _ = pipes(loaded)
    with pytest.raises(error, match=message):
        ours(**{"prompt": "a", "num_inference_steps": 1, **SIZE, **kwargs})


def test_bad_safety_concept(loaded):
    ours, _ = pipes(loaded)
    with pytest.raises(ValueError, match="safety_concept must be a non-empty string"):
        ours.safety_concept = " "


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_generate_safe(safe_folder, loaded, tmp_path, capsys):
    from stablepipe.cli import main

    argv = ["generate", "a red circle", "--model", str(safe_folder), "--dtype", "float32", "--steps", "2",
            "--seed", "3", "--width", "32",
            "--height", "32", "--safe", "max", "--safety-concept", "a blue square", "--out", str(tmp_path / "a.png"),
            "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["safe"] == "MAX" and report["settings"]["safety_concept"] == "a blue square"
    ours, _ = pipes(loaded, concept="a blue square")
    expected = generate(ours, 3, prompt="a red circle", num_inference_steps=2, output_type="pil", **SafetyConfig.MAX)
    import PIL.Image

    assert np.array_equal(np.asarray(PIL.Image.open(report["files"][0]["path"])), np.asarray(expected.images[0]))


def test_cli_generate_safe_errors(safe_folder, capsys):
    from stablepipe.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "x", "--safe", "EXTREME"])
    assert "invalid choice: 'EXTREME'" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(safe_folder), "--safety-concept", "y"]) == 2
    assert "--safety-concept needs --safe LEVEL" in capsys.readouterr().err


def test_safe_guidance_is_chosen_in_one_place():
    """On only with classifier-free guidance and sld_guidance_scale > 1; a fresh guider (no momentum) each time."""
    from stablepipe.pipelines.safe import choose_safe_guidance

    args = dict(sld_guidance_scale=1000.0, sld_warmup_steps=2, sld_threshold=0.01, sld_momentum_scale=0.3,
                sld_mom_beta=0.4)  # fmt: skip
    assert choose_safe_guidance(False, 1.0, **args) is None  # no guidance: nothing to steer against
    assert choose_safe_guidance(True, 7.5, **{**args, "sld_guidance_scale": 1.0}) is None  # switched off
    first, second = choose_safe_guidance(True, 7.5, **args), choose_safe_guidance(True, 7.5, **args)
    assert isinstance(first, SafeLatentDiffusion) and first is not second
    assert first.copies == 3 and first.scale == 7.5 and first.momentum is None
    prediction = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    uncond, cond, _ = prediction.chunk(3)
    during_warmup = first(0, torch.tensor(10), prediction)  # warmup: plain classifier-free guidance
    assert torch.allclose(during_warmup, uncond + 7.5 * (cond - uncond)) and first.momentum is not None
    assert not torch.allclose(first(2, torch.tensor(5), prediction), during_warmup)  # after warmup: steered
    with pytest.raises(ValueError, match="sld_warmup_steps"):
        choose_safe_guidance(True, 7.5, **{**args, "sld_warmup_steps": -1})
