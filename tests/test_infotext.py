"""AUTOMATIC1111's infotext: written in A1111's exact format and order, read back from A1111's own strings, and
the names and hashes it records (sampler + schedule type of a scheduler, short model and LoRA hashes)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from stablepipe.infotext import (
    a1111_params,
    format_infotext,
    lora_hash,
    model_hash,
    model_name,
    parse_infotext,
    read_settings,
)
from stablepipe.schedulers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from stablepipe.schedulers.names import A1111_SCHEDULERS, a1111_names_of, scheduler_from_a1111, scheduler_from_name

# As A1111 v1.10 writes them (the first: txt2img with hires fix and a LoRA; the second: img2img, older fields)
A1111_TXT2IMG = (
    "masterpiece, a castle on a hill, (detailed:1.2)\n"
    "Negative prompt: lowres, blurry\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3920432, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
)
A1111_IMG2IMG = (
    "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 1, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Version: v1.9.4"
)


def test_the_settings_line_is_a1111s_order_and_format():
    params = a1111_params(steps=20, sampler="Euler a", cfg_scale=7.0, seed=1, width=512, height=512,
                          model_hash="6ce0161689", model="v1-5-pruned-emaonly")
    text = format_infotext("a cat", None, params)
    assert text == ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, "
                    "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")
    full = a1111_params(steps=28, sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=7, seed=3920432, width=512,
                        height=768, model_hash="6ce0161689", model="v1-5-pruned-emaonly", denoising_strength=0.45,
                        clip_skip=1, extras={"Hires upscale": 2, "Hires upscaler": "Latent"},
                        lora_hashes={"add_detail": "7c6bad76eb54"})
    written = format_infotext("masterpiece, a castle on a hill, (detailed:1.2)", "lowres, blurry", full)
    assert written == A1111_TXT2IMG.removesuffix(", Version: v1.10.1")  # diffusers' clip_skip 1 is A1111's 2


def test_a1111s_strings_read_back_as_settings():
    settings, others = read_settings(A1111_TXT2IMG)
    assert settings == {
        "prompt": "masterpiece, a castle on a hill, (detailed:1.2)", "negative_prompt": "lowres, blurry",
        "steps": 28, "guidance": 7.0, "seed": 3920432, "strength": 0.45, "sampler": "DPM++ 2M",
        "schedule_type": "Karras", "width": 512, "height": 768, "clip_skip": 1, "model": "v1-5-pruned-emaonly",
        "model_hash": "6ce0161689",
    }
    assert others == {"Hires upscale": "2", "Hires upscaler": "Latent", "Lora hashes": "add_detail: 7c6bad76eb54"}
    settings, others = read_settings(A1111_IMG2IMG)
    assert (settings["sampler"], settings["schedule_type"], settings["guidance"], settings["strength"]) == (
        "Euler a", "Automatic", 7.5, 0.75)
    assert "clip_skip" not in settings and others == {}
    assert read_settings("a\nClip skip: 1, Steps: 2, Seed: 3")[0]["clip_skip"] is None  # 1 = no layer skipped
    with pytest.raises(ValueError, match="the infotext's Steps is 'many', not a int number"):
        read_settings("a cat\nSteps: many, Sampler: Euler, Seed: 1")


def test_written_infotext_parses_back_to_what_was_written():
    params = a1111_params(steps=3, sampler="DPM++ 2M SDE", schedule_type="Karras", cfg_scale=4.5, seed=2**40,
                          width=64, height=32, model="my, model: v2")
    parsed = parse_infotext(format_infotext("line one\nline two", "no: commas, here", params))
    assert parsed["Prompt"] == "line one\nline two" and parsed["Negative prompt"] == "no: commas, here"
    assert parsed["Model"] == "my, model: v2" and parsed["Seed"] == str(2**40) and parsed["CFG scale"] == "4.5"
    assert (parsed["Size-1"], parsed["Size-2"]) == (64, 32)


@pytest.mark.parametrize("scheduler, names", [
    (PNDMScheduler(skip_prk_steps=True), ("PLMS", "Automatic")),
    (PNDMScheduler(), ("PLMS", "Automatic")),
    (DDIMScheduler(), ("DDIM", "Automatic")),
    (EulerDiscreteScheduler(use_karras_sigmas=True), ("Euler", "Karras")),
    (EulerAncestralDiscreteScheduler(), ("Euler a", "Automatic")),
    (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), ("DPM++ 2M SDE", "Karras")),
    (DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     ("DPMSolverMultistepScheduler", "Automatic")),  # no A1111 name: the class name, not a wrong one
])
def test_a_scheduler_is_named_as_a1111_names_it(scheduler, names):
    assert a1111_names_of(scheduler) == names


def test_every_a1111_name_goes_round_trip():
    for name in A1111_SCHEDULERS:
        scheduler = scheduler_from_name(name, {})
        again = scheduler_from_a1111(*a1111_names_of(scheduler), {})
        assert type(again) is type(scheduler) and dict(again.config) == dict(scheduler.config), name


def test_model_and_lora_hashes_are_a1111s(tmp_path):
    weights = {"w": torch.arange(6, dtype=torch.float32)}
    file = tmp_path / "my-model.safetensors"
    save_file(weights, file)
    data = file.read_bytes()
    assert model_hash(file) == hashlib.sha256(data).hexdigest()[:10]
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(file) == hashlib.sha256(data[8 + header:]).hexdigest()[:12]  # the tensor bytes only
    assert model_name(file) == "my-model" and model_name("owner/repo") == "owner/repo"
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    shutil.copy(file, folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "model_index.json").write_text("{}")
    cache = tmp_path / "hashes.json"
    first = model_hash(folder, cache=cache)
    line = f"unet/diffusion_pytorch_model.safetensors {hashlib.sha256(data).hexdigest()}\n"
    assert first == hashlib.sha256(line.encode()).hexdigest()[:10]
    assert model_hash(shutil.copytree(folder, tmp_path / "moved")) == first  # the place does not count
    assert len(json.loads(cache.read_text())) == 1  # the file was hashed once and remembered
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no weight files"):
        model_hash(tmp_path / "empty")
