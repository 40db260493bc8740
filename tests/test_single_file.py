"""Single-file checkpoints: our exporter's files load in diffusers, original-layout files (made with diffusers'
own conversion) load in ours, with the same images; type detection on full-size layouts; safe reading;
`stablepipe convert` both ways."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import max_diff
from fixtures_single_file import diffusers_inverse, place, sd2_openclip_folder, sdxl_wide_folder  # noqa: F401

import stablepipe
from stablepipe.loading.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from stablepipe.loading.model_detection import detect_model_type, known_types, type_config
from stablepipe.loading.single_file import (
    ModelWeights,
    canonical_clip_names,
    folder_models,
    original_state_dict,
    save_single_file,
)

TOLERANCE = 2e-3
RUN = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def image(pipe, prompt="a red circle", seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**RUN, **kwargs}).images


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> float:
    x, y = a.state_dict(), b.state_dict()
    assert set(x) == set(y)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


# ---- our exporter -> diffusers' from_single_file --------------------------------------------------------------

EXPORT_CASES = {
    "sd1": ("StableDiffusionPipeline", "sd1_folder", ("unet", "vae", "text_encoder")),
    "sd2-openclip": ("StableDiffusionPipeline", "sd2_openclip_folder", ("unet", "vae", "text_encoder")),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl_wide_folder", ("unet", "vae", "text_encoder", "text_encoder_2")),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_exported_file_loads_in_diffusers_with_the_same_image(case, request, tmp_path):
    import diffusers

    name, fixture, models = EXPORT_CASES[case]
    folder = request.getfixturevalue(fixture)
    path = save_single_file(folder, tmp_path / "model.safetensors")
    theirs = getattr(diffusers, name).from_single_file(str(path), config=str(folder), local_files_only=True)
    ours = getattr(stablepipe, name).from_single_file(path, config=folder)
    reference = getattr(diffusers, name).from_pretrained(folder)
    for component in models:  # the weights land where diffusers puts them, exactly
        assert same_weights(getattr(ours, component), getattr(theirs, component)) == 0.0
        assert same_weights(getattr(ours, component), getattr(reference, component)) == 0.0
    assert type(ours.scheduler).__name__ == type(theirs.scheduler).__name__
    a, b = image(ours), image(theirs)
    assert max_diff(a, b) < TOLERANCE and a.std() > 0.01


def test_open_clip_layout_is_written_for_gelu_encoders(request):
    models, _ = folder_models(request.getfixturevalue("sd2_openclip_folder"))
    keys = original_state_dict(models)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


# ---- an original-layout file (diffusers' conversion, inverted) -> ours ---------------------------------------


def diffusers_converters(models: dict[str, ModelWeights], text_encoder):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    def with_prefix(prefix, convert):
        return prefix, lambda sd: convert({prefix + k: v for k, v in sd.items()})

    return {
        "unet": with_prefix("model.diffusion_model.", lambda c: convert_ldm_unet_checkpoint(c, models["unet"].config)),
        "vae": with_prefix("first_stage_model.", lambda c: convert_ldm_vae_checkpoint(c, models["vae"].config)),
        "clip": with_prefix("cond_stage_model.transformer.", convert_ldm_clip_checkpoint),
        "open_clip": with_prefix(
            "cond_stage_model.model.",
            lambda c: convert_open_clip_checkpoint(text_encoder, c, "cond_stage_model.model."),
        ),
    }


def original_layout_file(folder, text_layout: str) -> dict[str, torch.Tensor]:
    """The folder's weights in the original layout, each placed where diffusers' conversion reads it from."""
    import diffusers

    models, _ = folder_models(folder)
    proposal = {k: tuple(v.shape) for k, v in original_state_dict(models, text_encoder_layout=text_layout).items()}
    text_encoder = diffusers.StableDiffusionPipeline.from_pretrained(folder).text_encoder
    converters = diffusers_converters(models, text_encoder)
    state = {}
    for component, layout in (("unet", "unet"), ("vae", "vae"), ("text_encoder", text_layout)):
        prefix, convert = converters[layout]
        shapes = {k[len(prefix) :]: s for k, s in proposal.items() if k.startswith(prefix)}
        ours = models[component].state
        ours = canonical_clip_names(ours) if component == "text_encoder" else ours
        inverse = diffusers_inverse(shapes, convert)
        assert set(inverse) == set(ours), f"{component}: diffusers reads other weights than the folder has"
        state.update({prefix + k: v for k, v in place(inverse, shapes, ours).items()})
    return state


@pytest.mark.parametrize("text_layout", ["clip", "open_clip"])
def test_original_layout_ckpt_loads_like_diffusers(request, tmp_path, text_layout):
    import diffusers

    folder = request.getfixturevalue("sd2_openclip_folder")
    state = original_layout_file(folder, text_layout)
    state["model_ema.decay"] = torch.tensor(0.9999)  # what real training checkpoints also carry
    state["alphas_cumprod"] = torch.rand(1000)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 12345, "epoch": 3}, path)
    ours = stablepipe.StableDiffusionPipeline.from_single_file(path, config=folder)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True
    )
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    for component in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(ours, component), getattr(reference, component)) == 0.0
    a, b = image(ours), image(theirs)
    assert max_diff(a, b) < TOLERANCE and a.std() > 0.01


def test_older_spellings_and_extra_keys_are_accepted(sd1_folder, tmp_path):
    """CLIP weights without the `text_model.` level, the old position_ids buffer, float16 weights."""
    path = save_single_file(sd1_folder, tmp_path / "a.safetensors")
    state = read_checkpoint(path).state
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v.half()
           for k, v in state.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    write_checkpoint(old, tmp_path / "old.safetensors")
    pipe = stablepipe.StableDiffusionPipeline.from_single_file(tmp_path / "old.safetensors", config=sd1_folder)
    assert pipe.unet.dtype == torch.float32  # float32 unless torch_dtype says otherwise
    reference = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    emb = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb, reference.text_encoder.get_input_embeddings().weight.half().float())
    half = stablepipe.StableDiffusionPipeline.from_single_file(path, config=sd1_folder, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16


# ---- detection, on the full-size layouts (meta tensors: no memory) ------------------------------------------


def full_size_models(model_type: str) -> dict[str, ModelWeights]:
    import transformers

    from stablepipe.loading.components import resolve_class

    models = {}
    for name, entry in type_config(model_type)["components"].items():
        if entry is None or "prefix" not in entry:
            continue
        with torch.device("meta"):
            if entry["class"].startswith("CLIP"):
                cls = getattr(transformers, entry["class"])
                module = cls(cls.config_class.from_dict(entry["config"]))
            else:
                module = resolve_class("diffusers", entry["class"], component=name).from_config(entry["config"])
        models[name] = ModelWeights(entry["class"], entry["config"], module.state_dict())
    return models


@pytest.mark.parametrize("model_type", known_types())
def test_full_size_layouts_are_detected_and_match_diffusers(model_type):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    models = full_size_models(model_type)
    state = original_state_dict(models)
    detected = detect_model_type(state)
    assert detected.model_type == model_type
    assert detected.prediction_type == ("v_prediction" if model_type in ("sd2", "sd-x4-upscaler") else "epsilon")
    unet = convert_ldm_unet_checkpoint(state, models["unet"].config)
    assert set(unet) == set(models["unet"].state)  # the layout is the one diffusers reads from real files
    vae = convert_ldm_vae_checkpoint(state, models["vae"].config)
    assert set(vae) == set(models["vae"].state)
    diffusers_name = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base", "sdxl-refiner": "xl_refiner",
                      "sd-x4-upscaler": "upscale", "sd1-inpaint": "inpainting", "sd2-inpaint": "inpainting_v2",
                      "sdxl-inpaint": "xl_inpaint"}.get(model_type)
    if diffusers_name:
        assert infer_diffusers_model_type(state) == diffusers_name


def test_sd2_prediction_type_signals():
    state = original_state_dict(full_size_models("sd2"))
    assert detect_model_type(state).prediction_type == "v_prediction"
    assert detect_model_type(state, global_step=875000).prediction_type == "epsilon"  # the 512 px base model
    assert detect_model_type(state, metadata={"modelspec.prediction_type": "epsilon"}).prediction_type == "epsilon"
    spec = {"modelspec.architecture": "stable-diffusion-v2-512"}
    assert detect_model_type(state, metadata=spec).prediction_type == "epsilon"
    marked = {**state, "v_pred": torch.tensor([])}
    assert detect_model_type(marked, global_step=875000).prediction_type == "v_prediction"


def test_unknown_architecture_asks_for_config(sd1_folder, tmp_path):
    path = save_single_file(sd1_folder, tmp_path / "tiny.safetensors")  # 32-wide cross-attention: no known type
    with pytest.raises(ValueError, match="Pass `config=` with a diffusers folder"):
        stablepipe.StableDiffusionPipeline.from_single_file(path)


def test_shipped_config_plan_builds_the_pipeline(sd1_folder, tmp_path):
    """The no-`config=` path: a type description (here a tiny one) builds every component; the tokenizer comes
    from the package (here a tiny one's folder instead), the scheduler from the shipped config with the
    prediction type."""
    from stablepipe.loading.checkpoint import read_checkpoint as read
    from stablepipe.loading.single_file import build_components, plan_from_type

    data = type_config("sd1")
    reference = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    for name in ("unet", "vae", "text_encoder"):
        data["components"][name]["config"] = dict(getattr(reference, name).config.to_dict()
                                                  if name == "text_encoder" else getattr(reference, name).config)
    data["components"]["tokenizer"] = {"class": "CLIPTokenizer", "repo": str(sd1_folder), "subfolder": "tokenizer"}
    path = save_single_file(sd1_folder, tmp_path / "m.safetensors")
    plan = plan_from_type(data, "v_prediction")
    built = build_components(
        stablepipe.StableDiffusionPipeline, plan, read(path), given={}, torch_dtype=torch.float32,
        prediction_type="v_prediction", hub_kwargs={},
    )
    assert type(built["scheduler"]).__name__ == "PNDMScheduler"
    assert built["scheduler"].config.prediction_type == "v_prediction"
    assert built["safety_checker"] is None
    assert built["tokenizer"]("a red").input_ids == reference.tokenizer("a red").input_ids
    assert same_weights(built["unet"], reference.unet) == 0.0


KNOWN_IDS = {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407]}  # CLIP's ids, as every SD tool has them


@pytest.mark.parametrize("model_type", ["sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sd2-depth", "sd-x4-upscaler",
                                        "sdxl", "sdxl-refiner", "sdxl-inpaint"])
def test_every_known_type_gets_clip_tokenizers_from_the_package(model_type, monkeypatch, tmp_path):
    """No `config=`, no network: the tokenizers come from the vocabulary shipped in the package, with the
    padding of the model's own tokenizer folders (<|endoftext|> for CLIP ViT-L, "!" for the OpenCLIP encoders)."""
    from stablepipe.loading.single_file import build_loaded, plan_from_type

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.snapshot_download", None)  # any download attempt fails loudly
    plan = plan_from_type(type_config(model_type), "epsilon")
    names = [n for n in ("tokenizer", "tokenizer_2") if plan.components.get(n) is not None]
    assert names == {"sdxl": ["tokenizer", "tokenizer_2"], "sdxl-inpaint": ["tokenizer", "tokenizer_2"],
                     "sdxl-refiner": ["tokenizer_2"]}.get(model_type, ["tokenizer"])
    open_clip = model_type.startswith(("sd2", "sd-x4")) or model_type == "sdxl-refiner"
    for name in names:
        tokenizer = build_loaded(plan.components[name], name=name, torch_dtype=torch.float32, hub_kwargs={})
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
        assert tokenizer("a photo of a cat").input_ids == KNOWN_IDS["a photo of a cat"]
        assert tokenizer.pad_token == ("!" if open_clip or name == "tokenizer_2" else "<|endoftext|>")
        padded = tokenizer("A Photo of a CAT", padding="max_length", max_length=77).input_ids  # lower-cased
        assert padded[:7] == KNOWN_IDS["a photo of a cat"] and padded[7] == tokenizer.pad_token_id


def test_shipped_vocabulary_is_written_once(monkeypatch, tmp_path):
    from stablepipe.loading.clip_tokenizer import clip_tokenizer

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path))
    first = clip_tokenizer()
    vocab = tmp_path / "clip-vocabulary" / "vocab.json"
    stamp = vocab.stat().st_mtime_ns
    assert clip_tokenizer("!")("café").input_ids == first("café").input_ids and vocab.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="pad_token must be one of"):
        clip_tokenizer("<pad>")


def test_missing_tokenizer_offline_names_the_repo(sd1_folder, tmp_path, monkeypatch):
    from stablepipe.loading.single_file import ComponentSpec, build_loaded

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ComponentSpec("CLIPTokenizer", source="nobody-here/no-such-model", subfolder="tokenizer",
                         library="transformers")
    with pytest.raises(OSError, match="Hub repo .nobody-here/no-such-model.(.|\n)*Pass `tokenizer=...`"):
        build_loaded(spec, name="tokenizer", torch_dtype=torch.float32, hub_kwargs={"local_files_only": True})


# ---- reading safely ----------------------------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_code_running_pickle_is_refused_and_runs_nothing(sd1_folder, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": RunsCode(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"needs code to unpickle \(os.makedirs\).*never runs code"):
        stablepipe.StableDiffusionPipeline.from_single_file(tmp_path / "evil.ckpt", config=sd1_folder)
    assert not marker.exists()
    torch.save({"x": RunsCode(str(marker))}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="safe unpickler"):
        read_checkpoint(tmp_path / "legacy.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_and_corrupt_files_give_clear_errors(sd1_folder, tmp_path, suffix):
    path = save_single_file(sd1_folder, tmp_path / f"whole{suffix}")
    data = path.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        stablepipe.StableDiffusionPipeline.from_single_file(tmp_path / f"cut{suffix}", config=sd1_folder)
    rng = random.Random(0)
    for _ in range(100):  # random bytes break the unpickler in many ways: each is reported the same
        (tmp_path / f"noise{suffix}").write_bytes(rng.randbytes(4096))
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_checkpoint(tmp_path / f"noise{suffix}")


def test_lightning_callbacks_are_skipped_without_running_them(tmp_path, monkeypatch):
    """Old training checkpoints pickle Lightning's ModelCheckpoint; it is replaced by an inert stand-in."""
    import sys
    import types

    class ModelCheckpoint:
        def __setstate__(self, state):  # would run if the real class were used
            raise AssertionError("callback code ran")

    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    state = {"state_dict": {"w": torch.ones(2)}, "global_step": 875000, "callbacks": {"cb": ModelCheckpoint()}}
    torch.save(state, tmp_path / "lightning.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    checkpoint = read_checkpoint(tmp_path / "lightning.ckpt")
    assert checkpoint.global_step == 875000 and torch.equal(checkpoint.state["w"], torch.ones(2))


def test_other_files_are_recognised(tmp_path):
    write_checkpoint({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="looks like a LoRA"):
        stablepipe.StableDiffusionPipeline.from_single_file(tmp_path / "lora.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        stablepipe.StableDiffusionPipeline.from_single_file(tmp_path / "missing.safetensors")


def test_hub_file_url_offline_names_repo_and_file(tmp_path):
    url = "https://huggingface.co/nobody-here/no-model/blob/main/model.safetensors"
    with pytest.raises(OSError, match="'model.safetensors' of Hub repo 'nobody-here/no-model'"):
        stablepipe.StableDiffusionPipeline.from_single_file(url, cache_dir=tmp_path, local_files_only=True)


# ---- stablepipe convert --------------------------------------------------------------------------------------


def test_convert_both_ways(sd1_folder, tmp_path):
    from stablepipe.cli import main

    single = tmp_path / "model.safetensors"
    assert main(["convert", str(sd1_folder), str(single), "--json"]) == 0
    back = tmp_path / "folder"
    assert main(["convert", str(single), str(back), "--config", str(sd1_folder), "--json"]) == 0
    again = tmp_path / "again.ckpt"
    assert main(["convert", str(back), str(again), "--json"]) == 0
    a, b = read_checkpoint(single).state, read_checkpoint(again).state
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    reference = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    converted = stablepipe.StableDiffusionPipeline.from_pretrained(back)
    assert np.array_equal(image(reference), image(converted))
    assert main(["convert", str(sd1_folder), str(tmp_path / "x.bin.txt")]) == 2
    shutil.rmtree(back)
