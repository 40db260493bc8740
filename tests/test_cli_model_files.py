"""The command line with the files people download: a single-file checkpoint as --model, --lora, --embedding,
and --prompt-weighting, each giving the picture the Python API gives."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from fixtures_sdxl import sdxl_folder  # noqa: F401  (fixture)
from test_lora import kohya_sd1_lora
from test_textual_inversion import a1111_pt

import stablepipe
from stablepipe.cli import main
from stablepipe.loading.checkpoint import write_checkpoint
from stablepipe.loading.single_file import save_single_file

RUN = ["--steps", "2", "--seed", "4", "--width", "32", "--height", "32", "--dtype", "float32", "--quiet",
       "--no-safety-checker"]


def expected(pipe, prompt: str, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=2, width=32, height=32, generator=[torch.Generator().manual_seed(4)],
               **kwargs)
    return np.asarray(out.images[0])


def written(path) -> tuple[np.ndarray, dict]:
    image = PIL.Image.open(path)
    return np.asarray(image), json.loads(image.text["stablepipe"])


def test_single_file_model_with_config(sd1_folder, tmp_path):
    checkpoint = save_single_file(sd1_folder, tmp_path / "tiny.safetensors")
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(checkpoint), "--config", str(sd1_folder), *RUN,
                 "--out", str(out)]) == 0
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    pixels, settings = written(out)
    assert np.array_equal(pixels, expected(pipe, "a red circle")) and settings["model"] == str(checkpoint)


def test_config_without_a_single_file_and_missing_files_exit_2(sd1_folder, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(sd1_folder), "--config", str(sd1_folder), *RUN]) == 2
    assert "--config describes a single-file --model" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path / "none.safetensors"), *RUN]) == 2
    assert "no checkpoint file" in capsys.readouterr().err


def test_loras_with_scales_and_an_embedding(sd1_folder, tmp_path):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    first, second = tmp_path / "style.safetensors", tmp_path / "detail.safetensors"
    write_checkpoint(kohya_sd1_lora(pipe, seed=0), first)
    write_checkpoint(kohya_sd1_lora(pipe, seed=3), second)
    embedding = a1111_pt(tmp_path / "mystyle.pt", "mystyle", 2)
    out = tmp_path / "b.png"
    prompt = "a red circle in mystyle"
    assert main(["generate", prompt, "--model", str(sd1_folder), "--lora", f"{first}:0.7", "--lora", str(second),
                 "--embedding", str(embedding), *RUN, "--out", str(out)]) == 0
    plain = expected(pipe, prompt)
    pipe.load_lora_weights(first, adapter_name="a")
    pipe.load_lora_weights(second, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 1.0])
    pipe.load_textual_inversion(embedding)
    pixels, settings = written(out)
    assert np.array_equal(pixels, expected(pipe, prompt))
    assert np.abs(pixels.astype(int) - plain).max() > 2  # the files did change the picture
    assert settings["lora"] == [f"{first}:0.7", str(second)] and settings["embedding"] == [str(embedding)]


def test_prompt_weighting_flag(sd1_folder, tmp_path):
    prompt = ", ".join(["a (red:1.4) circle on the [sea]"] * 8)  # weights, and more than 77 tokens
    out = tmp_path / "c.png"
    assert main(["generate", prompt, "--model", str(sd1_folder), "--prompt-weighting", *RUN, "--out", str(out)]) == 0
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    plain = expected(pipe, prompt)
    pipe.prompt_weighting = True
    pixels, settings = written(out)
    assert np.array_equal(pixels, expected(pipe, prompt)) and settings["prompt_weighting"] is True
    assert not np.array_equal(pixels, plain)


@pytest.mark.parametrize("value", ["x.safetensors:", "x.safetensors:strong"])
def test_bad_lora_scale_exits_2(sd1_folder, value, capsys):
    assert main(["generate", "x", "--model", str(sd1_folder), "--lora", value, *RUN]) == 2
    assert "--lora" in capsys.readouterr().err


def test_sdxl_single_file_is_recognised_by_its_weights(sdxl_folder, sd1_folder, tmp_path):  # noqa: F811
    import argparse

    from stablepipe.cli.sdxl import model_is_sdxl

    sdxl_file = save_single_file(sdxl_folder, tmp_path / "xl.safetensors")
    sd1_file = save_single_file(sd1_folder, tmp_path / "sd1.safetensors")
    args = dict(revision=None, config=None)
    assert model_is_sdxl(argparse.Namespace(model=str(sdxl_file), **args))
    assert not model_is_sdxl(argparse.Namespace(model=str(sd1_file), **args))
    out = tmp_path / "xl.png"
    assert main(["generate", "a lion", "--model", str(sdxl_file), "--config", str(sdxl_folder), *RUN,
                 "--out", str(out)]) == 0
    pipe = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    assert np.array_equal(written(out)[0], expected(pipe, "a lion"))
