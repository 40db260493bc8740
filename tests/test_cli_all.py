"""Every `stablepipe` subcommand through the installed entry point: the same flag names everywhere, a run with
`--json` that writes PNGs with their settings, and bad input that exits non-zero with one line saying what to fix.
(`generate` itself is tested in test_cli.py.)

The commands are independent processes, so each group runs a few at a time; each test reads its own result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import fixtures_image
import numpy as np
import PIL.Image
import pytest
import torch

from stablepipe.cli import COMMANDS, build_parser

depth_folder = fixtures_image.depth_folder  # session fixtures: tiny diffusers depth and 9-channel inpaint models
inpaint_folder = fixtures_image.inpaint_folder
PARALLEL = 3  # processes at a time: each is mostly the import of torch and transformers

MODEL_FLAGS = {"--model", "--variant", "--revision", "--device", "--dtype", "--no-safety-checker"}
GENERATION_FLAGS = {"--negative-prompt", "--steps", "--guidance", "--scheduler", "--seed", "--width", "--height",
                    "--num-images", "--clip-skip"}
OUTPUT_FLAGS = {"--out", "--json", "--quiet"}
IMAGE_COMMANDS = ("generate", "img2img", "inpaint", "depth2img", "variation", "upscale", "ldm3d")


def flags_of(command: str) -> set[str]:
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_task_is_a_subcommand():
    registered = set(build_parser()._subparsers._group_actions[0].choices)
    assert registered == set(COMMANDS) == {*IMAGE_COMMANDS, "ui", "serve", "batch", "convert"}


@pytest.mark.parametrize("command", IMAGE_COMMANDS)
def test_the_same_flag_names_everywhere(command):
    assert MODEL_FLAGS | GENERATION_FLAGS | OUTPUT_FLAGS <= flags_of(command)


def test_ui_and_convert_flags():
    assert MODEL_FLAGS | {"--host", "--port", "--out", "--load"} <= flags_of("ui")
    assert {"--dtype", "--json"} <= flags_of("convert")


# ---- running them -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh stablepipe cache with the built-in model and the tiny random one (the other built-in models derive
    from it) built once up front, offline, one thread per process."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "STABLEPIPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STABLEPIPE_CACHE", str(cache))
        from stablepipe.builtin import builtin_model_path, random_model_path

        builtin_model_path(), random_model_path()
    return env


def stablepipe(*args: str, env) -> subprocess.CompletedProcess:
    exe = shutil.which("stablepipe")
    assert exe, "the stablepipe entry point is not installed (pip install -e .)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def run_all(commands: dict[str, list], env) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(stablepipe, *args, env=env) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    fixtures_image.sample_image(64, 48).save(folder / "picture.png")
    fixtures_image.sample_mask(64, 48, box=(16, 8, 48, 40)).save(folder / "mask.png")
    fixtures_image.sample_image(16, 16).save(folder / "small.png")
    fixtures_image.sample_image(32, 32).save(folder / "medium.png")
    fixtures_image.sample_image(64, 64).save(folder / "square.png")
    return folder


def successful_commands(inputs, out, depth, inpaint) -> dict[str, list]:
    fast = ["--steps", "2", "--json"]
    return {
        "img2img": ["img2img", "a cat", "--image", inputs / "picture.png", "--strength", "0.5", "--seed", "1",
                    "--out", out / "img2img", *fast],
        "inpaint": ["inpaint", "a cat", "--image", inputs / "picture.png", "--mask", inputs / "mask.png",
                    "--model", inpaint, "--num-images", "2", "--seed", "2", "--out", out / "inpaint", *fast],
        "depth2img": ["depth2img", "a cat", "--image", inputs / "medium.png", "--model", depth, "--seed", "3",
                      "--scheduler", "Euler", "--out", out / "depth2img", *fast],
        "variation": ["variation", inputs / "picture.png", "--width", "64", "--height", "64", "--seed", "4",
                      "--out", out / "variation", *fast],
        "upscale-x4": ["upscale", "--x4", inputs / "small.png", "--prompt", "a cat", "--noise-level", "30",
                       "--seed", "5", "--out", out / "x4", *fast],
        "upscale-x2": ["upscale", "--x2", inputs / "square.png", "--seed", "6", "--out", out / "x2", *fast],
        "ldm3d": ["ldm3d", "a cat", "--width", "64", "--height", "64", "--seed", "7", "--out", out / "ldm3d", *fast],
    }


@pytest.fixture(scope="module")
def successes(env, inputs, depth_folder, inpaint_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run_all(successful_commands(inputs, out, depth_folder, inpaint_folder), env)


# name: (seeds written, the (width, height) of every image, settings that must be in the PNGs and the report)
EXPECTED = {
    "img2img": ([1], (64, 48), {"command": "img2img", "strength": 0.5, "prompt": "a cat"}),
    "inpaint": ([2, 3], (64, 48), {"command": "inpaint", "strength": 1.0}),
    "depth2img": ([3], (32, 32), {"command": "depth2img", "scheduler": "Euler"}),
    "variation": ([4], (64, 64), {"command": "variation"}),
    "upscale-x4": ([5], (64, 64), {"command": "upscale", "upscaler": "x4", "noise_level": 30}),
    "upscale-x2": ([6], (128, 128), {"command": "upscale", "upscaler": "x2"}),
    "ldm3d": ([7, 7], (64, 64), {"command": "ldm3d"}),  # the RGB image and its depth map
}


@pytest.mark.parametrize("name", EXPECTED)
def test_each_subcommand_writes_pngs_with_settings_and_reports_them_as_json(successes, name):
    run = successes[name]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # nothing but the JSON on stdout
    seeds, size, settings = EXPECTED[name]
    assert [entry["seed"] for entry in report["files"]] == seeds
    assert settings.items() <= report["settings"].items()
    for entry in report["files"]:
        image = PIL.Image.open(entry["path"])
        assert image.size == size
        saved = json.loads(image.text["stablepipe"])
        assert saved["seed"] == entry["seed"] and settings.items() <= saved.items()


def test_ldm3d_writes_a_16_bit_depth_map_beside_the_rgb_image(successes):
    files = json.loads(successes["ldm3d"].stdout)["files"]
    assert [entry["kind"] for entry in files] == ["rgb", "depth"]
    rgb, depth = (PIL.Image.open(entry["path"]) for entry in files)
    assert rgb.mode == "RGB" and depth.mode in ("I;16", "I") and np.asarray(depth).max() > 255


BAD_INPUT = {  # command: (arguments, what the one line says)
    "img2img": (["x", "--image", "{tmp}/missing.png"], "--image: no image file at"),
    "inpaint": (["x", "--image", "{picture}", "--mask", "{tmp}/missing.png"], "--mask: no image file at"),
    "depth2img": (["x", "--image", "{picture}"], "depth2img needs a depth model"),
    "variation": (["{tmp}/missing.png"], "no image file at"),
    "upscale": (["--x2", "{picture}", "--noise-level", "5"], "--noise-level is for --x4 only"),
    "ldm3d": (["x", "--num-images", "0"], "--num-images must be at least 1"),
    "ui": (["--port", "70000"], "--port must be from 1 to 65535"),
    "convert": (["{tmp}/nothing-here", "{tmp}/x.safetensors"], "is neither a .safetensors/.ckpt"),
}


@pytest.mark.parametrize("command", BAD_INPUT)
def test_bad_input_exits_nonzero_with_one_line_saying_what_to_fix(command, inputs, tmp_path, capsys, monkeypatch):
    """In this process, through `main` (what the entry point calls): these stop before loading any model, so a
    new process would only add the import of torch to each."""
    from stablepipe.cli import main

    monkeypatch.delenv("STABLEPIPE_DEBUG", raising=False)
    args, message = BAD_INPUT[command]
    args = [a.format(tmp=tmp_path, picture=inputs / "picture.png") for a in args]
    status = main([command, *args, *(["--out", str(tmp_path)] if command != "convert" else [])])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and "built-in tiny" not in line]
    assert status == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith(f"stablepipe {command}: error: ") and message in lines[0], err


def test_ui_without_gradio_says_how_to_install_it(capsys, monkeypatch):
    import sys

    from stablepipe.cli import main

    for name in [m for m in sys.modules if m == "gradio" or m.startswith(("gradio.", "stablepipe.ui."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as if it were not installed
    assert main(["ui", "--port", "7999"]) == 2
    assert capsys.readouterr().err == 'stablepipe ui: error: the web app needs gradio: pip install "stablepipe[ui]"\n'


def test_convert_a_folder_to_one_file_and_back(env, tmp_path):
    from stablepipe.builtin import BUILTIN_NAME
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    source = os.path.join(env["STABLEPIPE_CACHE"], BUILTIN_NAME)
    single, folder = tmp_path / "tiny.safetensors", tmp_path / "tiny"
    to_file = stablepipe("convert", source, single, "--json", env=env)
    assert to_file.returncode == 0, to_file.stderr
    assert json.loads(to_file.stdout) == {"files": [], "written": str(single), "direction": "folder->file"}
    back = stablepipe("convert", single, folder, "--json", "--config", source, env=env)
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["pipeline"] == "StableDiffusionPipeline"
    before, after = (StableDiffusionPipeline.from_pretrained(f).unet.state_dict() for f in (source, folder))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
