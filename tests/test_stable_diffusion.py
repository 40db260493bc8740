"""Text-to-image: same folder, same seed, same image as diffusers; components; saving; errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import max_diff

import stablepipe

TOLERANCE = 2e-3


def load_both(folder, scheduler: str | None = None, **kwargs):
    import diffusers

    ours = stablepipe.StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    if scheduler:
        ours.scheduler = getattr(stablepipe, scheduler).from_config(ours.scheduler.config)
        theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def run_both(ours, theirs, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np", **kwargs}
    a = ours(generator=torch.Generator().manual_seed(seed), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(seed), **kwargs).images
    assert a.shape == b.shape
    return max_diff(a, b), a


SD1_CASES = {
    "pndm-guided": dict(scheduler=None, call=dict(prompt="a red circle", guidance_scale=7.5)),
    "pndm-unguided": dict(scheduler=None, call=dict(prompt="a red circle", guidance_scale=1.0)),
    "ddim-eta": dict(scheduler="DDIMScheduler", call=dict(prompt="the sea", eta=0.5)),
    "euler-batch": dict(
        scheduler="EulerDiscreteScheduler",
        call=dict(prompt=["a red circle", "on the sea"], negative_prompt=["blue", "green"], num_images_per_prompt=2),
    ),
    "euler-nonsquare": dict(scheduler="EulerDiscreteScheduler", call=dict(prompt="an owl", height=48, width=32)),
}


@pytest.mark.parametrize("case", SD1_CASES)
def test_sd1_matches_diffusers(sd1_folder, case):
    spec = SD1_CASES[case]
    ours, theirs = load_both(sd1_folder, spec["scheduler"])
    diff, images = run_both(ours, theirs, **spec["call"])
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    assert images.std() > 0.01  # a real picture, not a constant


SD2_CASES = {
    "ddim-v": dict(prompt="a castle", guidance_scale=6.0),
    "rescale": dict(prompt="a castle", guidance_scale=6.0, guidance_rescale=0.7),
    "euler-v-batch": dict(prompt=["a castle", "a ship"], num_images_per_prompt=2, negative_prompt=["fog", "rain"]),
}


@pytest.mark.parametrize("case", SD2_CASES)
def test_sd2_matches_diffusers(sd2_folder, case):
    scheduler = "EulerDiscreteScheduler" if case.startswith("euler") else None
    ours, theirs = load_both(sd2_folder, scheduler)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    diff, _ = run_both(ours, theirs, **SD2_CASES[case])
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"


def test_clip_skip_uses_the_penultimate_layer(sd1_folder):
    # diffusers 0.42 cannot run clip_skip with transformers 5 (it looks for `text_model`), so the reference
    # embeddings are computed by hand and given to diffusers as prompt_embeds.
    ours, theirs = load_both(sd1_folder)
    ids = theirs.tokenizer("an owl", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = theirs.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = theirs.text_encoder.final_layer_norm(hidden)
    with torch.no_grad():
        embeds, _ = ours.encode_prompt("an owl", torch.device("cpu"), 1, False, clip_skip=1)
        plain, _ = ours.encode_prompt("an owl", torch.device("cpu"), 1, False)
    assert max_diff(embeds, expected) < 1e-6
    assert max_diff(embeds, plain) > 1e-2
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = ours("an owl", clip_skip=1, generator=torch.Generator().manual_seed(0), **common).images
    b = theirs(prompt_embeds=expected, generator=torch.Generator().manual_seed(0), **common).images
    assert max_diff(a, b) < TOLERANCE


def test_generator_list_and_given_latents(sd1_folder):
    ours, theirs = load_both(sd1_folder)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = ours("x", num_images_per_prompt=2, generator=generators, **common).images
    single = ours("x", generator=torch.Generator().manual_seed(4), **common).images
    assert max_diff(a[1], single[0]) < 1e-5  # image 2 of the batch is the seed-4 image
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    diff, _ = run_both(ours, theirs, prompt="x", latents=latents)
    assert diff < TOLERANCE


def test_output_types_agree(sd1_folder):
    ours, _ = load_both(sd1_folder)
    common = dict(prompt="a cat", num_inference_steps=2, height=32, width=32)
    as_np = ours(generator=torch.Generator().manual_seed(1), output_type="np", **common).images
    as_pt = ours(generator=torch.Generator().manual_seed(1), output_type="pt", **common).images
    as_pil = ours(generator=torch.Generator().manual_seed(1), output_type="pil", **common).images
    latent = ours(generator=torch.Generator().manual_seed(1), output_type="latent", **common).images
    assert as_pt.shape == (1, 3, 32, 32) and latent.shape == (1, 4, 16, 16)
    assert max_diff(as_pt.permute(0, 2, 3, 1).numpy(), as_np) < 1e-6
    assert max_diff(np.asarray(as_pil[0]) / 255.0, as_np[0]) <= 0.5 / 255 + 1e-6


def test_callback_on_step_end_sees_and_replaces_latents(sd1_folder):
    ours, _ = load_both(sd1_folder, "DDIMScheduler")
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape), tensors["prompt_embeds"].shape[0]))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = ours("a", num_inference_steps=3, height=32, width=32, output_type="latent", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
               generator=torch.Generator().manual_seed(0))
    # the prompt embeddings as the UNet sees them, (uncond, cond) stacked, as diffusers gives them
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, 16, 16) and seen[0][3] == 2
    assert torch.count_nonzero(out.images) == 0


def test_prompt_embeds_input_matches_prompt(sd1_folder):
    ours, _ = load_both(sd1_folder)
    embeds, negative = ours.encode_prompt("a dog", torch.device("cpu"), 1, True, negative_prompt="cat")
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = ours("a dog", negative_prompt="cat", generator=torch.Generator().manual_seed(0), **common).images
    b = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0),
             **common).images
    assert max_diff(a, b) < 1e-6


def test_components_share_weights(sd1_folder):
    ours, _ = load_both(sd1_folder)
    other = stablepipe.StableDiffusionPipeline(**ours.components)
    assert other.unet is ours.unet
    assert other.unet.conv_in.weight.data_ptr() == ours.unet.conv_in.weight.data_ptr()
    assert set(ours.components) == {
        "vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor", "image_encoder"
    }


def test_safety_checker_matches_diffusers(sd1_safety_folder):
    ours, theirs = load_both(sd1_safety_folder)
    assert ours.safety_checker is not None
    common = dict(prompt="a", num_inference_steps=2, height=32, width=32, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(0), **common)
    b = theirs(generator=torch.Generator().manual_seed(0), **common)
    assert a.nsfw_content_detected == b.nsfw_content_detected
    assert max_diff(a.images, b.images) < TOLERANCE


def test_safety_checker_none_warns_once(sd1_safety_folder):
    with pytest.warns(UserWarning, match="safety checker is off") as record:
        pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_safety_folder, safety_checker=None)
    assert len([w for w in record if "safety checker" in str(w.message)]) == 1
    out = pipe("a", num_inference_steps=1, height=32, width=32, output_type="np")
    assert out.nsfw_content_detected is None


def test_saved_folder_loads_in_diffusers_with_same_image(sd2_folder, tmp_path):
    import diffusers

    ours = stablepipe.StableDiffusionPipeline.from_pretrained(sd2_folder)
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    back = stablepipe.StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    for pipe in (ours, theirs, back):
        pipe.set_progress_bar_config(disable=True)
    diff, _ = run_both(ours, theirs, prompt="x")
    assert diff < TOLERANCE
    diff_back, _ = run_both(ours, back, prompt="x")
    assert diff_back == 0.0


def test_fp16_variant_and_dtype(sd1_folder, tmp_path):
    ours = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    ours.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = stablepipe.StableDiffusionPipeline.from_pretrained(
        tmp_path / "v", variant="fp16", torch_dtype=torch.bfloat16
    )
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert half.text_encoder.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="`variant=fp8`") as error:
        stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, variant="fp8")
    assert isinstance(error.value, ValueError)  # what diffusers raises, so `except ValueError` code keeps working
    assert "load without variant=" in str(error.value)


def test_variant_where_some_components_have_it(sd1_folder, tmp_path):
    """As in diffusers: components without the variant's files load their plain weights."""
    ours = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    ours.save_pretrained(tmp_path / "mixed")
    ours.unet.save_pretrained(tmp_path / "mixed" / "unet", variant="fp16")
    (tmp_path / "mixed" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    back = stablepipe.StableDiffusionPipeline.from_pretrained(tmp_path / "mixed", variant="fp16")
    assert torch.equal(back.vae.decoder.conv_out.weight, ours.vae.decoder.conv_out.weight)
    assert torch.equal(back.unet.conv_in.weight, ours.unet.conv_in.weight)
    with pytest.raises(FileNotFoundError, match="Error no file named diffusion_pytorch_model.bin") as error:
        stablepipe.UNet2DConditionModel.from_pretrained(tmp_path / "mixed" / "unet")
    assert "pass variant='fp16'" in str(error.value)


# ---- errors ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    p = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a", height=30, width=32), "height must be a positive multiple of 8"),
        (dict(prompt="a", height=32, width=33), "width must be a positive multiple of 8"),
        (dict(prompt="a", num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "got 1 negative prompts for 2 prompts"),
        (dict(prompt="a", negative_prompt=["c"]), "negative_prompt` is a list but `prompt` is a string"),
        (dict(prompt=None), "give a `prompt`"),
        (dict(prompt="a", output_type="jpeg"), "output_type must be one of"),
        (dict(prompt="a", timesteps=[999, 500], sigmas=[1.0, 0.5]), "either custom `timesteps` or custom `sigmas`"),
        (dict(prompt="a", generator=[torch.Generator()] * 3), "3 generators"),
        (dict(prompt="a", strength=0.5), "unknown arguments \\['strength'\\]"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**{"num_inference_steps": 1, "height": 32, "width": 32, **kwargs})


def test_missing_component_folder(sd1_folder, tmp_path):
    broken = shutil.copytree(sd1_folder, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="component 'vae'.*missing"):
        stablepipe.StableDiffusionPipeline.from_pretrained(broken)


def test_wrong_and_missing_weights_are_named(sd1_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(sd1_folder, tmp_path / "broken")
    path = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = torch.zeros(3, 3)
    del state["conv_out.bias"]
    save_file(state, path)
    missing = r"diffusion_pytorch_model.safetensors.*missing: conv_out.bias.*conv_in.weight"
    with pytest.raises(ValueError, match=missing):
        stablepipe.StableDiffusionPipeline.from_pretrained(broken)


def test_unknown_scheduler_class_lists_known(sd1_folder, tmp_path):
    broken = shutil.copytree(sd1_folder, tmp_path / "broken")
    index = json.loads((broken / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FancyScheduler"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unknown scheduler 'FancyScheduler'.*EulerDiscreteScheduler"):
        stablepipe.StableDiffusionPipeline.from_pretrained(broken)


def test_not_a_folder_or_repo():
    with pytest.raises(OSError, match="not-a-model/anywhere"):
        stablepipe.StableDiffusionPipeline.from_pretrained("not-a-model/anywhere")


# ---- callbacks that change the guidance mid-call (diffusers' documented recipes) ------------------------------


def dynamic_cfg(pipe, i, t, tensors):
    """diffusers' "dynamic classifier-free guidance" recipe: guidance off after 40 % of the steps."""
    if i == int(pipe.num_timesteps * 0.4):
        tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        pipe._guidance_scale = 0.0
    return tensors


def growing_guidance(pipe, i, t, tensors):
    pipe._guidance_scale += 1.0
    return tensors


@pytest.mark.parametrize("callback", [dynamic_cfg, growing_guidance])
def test_callbacks_changing_the_guidance_match_diffusers(sd1_folder, callback):
    ours, theirs = load_both(sd1_folder, "EulerDiscreteScheduler")
    call = dict(prompt=["a red circle", "the sea"], negative_prompt=["blue", "green"], guidance_scale=5.0,
                num_inference_steps=5, height=32, width=32, output_type="np", callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])  # fmt: skip
    a = ours(generator=torch.Generator().manual_seed(0), **call).images
    b = theirs(generator=torch.Generator().manual_seed(0), **call).images
    assert max_diff(a, b) < TOLERANCE
    assert ours.guidance_scale == theirs.guidance_scale  # as the callback left it
    assert ours.do_classifier_free_guidance == theirs.do_classifier_free_guidance
    plain = ours(generator=torch.Generator().manual_seed(0), **{**call, "callback_on_step_end": None}).images
    assert max_diff(a, plain) > 1e-3  # the callback did change the picture


def test_device_map_puts_the_pipeline_on_one_device(sd1_folder):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, device_map="cpu")
    assert pipe.device == torch.device("cpu") and pipe.unet.device == torch.device("cpu")
    pipe = stablepipe.DiffusionPipeline.from_pretrained(sd1_folder, device_map={"": "cpu"})
    assert isinstance(pipe, stablepipe.StableDiffusionPipeline) and pipe.vae.device == torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, device_map="balanced")
    with pytest.raises(ValueError, match="not a device"):
        stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, device_map="gpu0")
