"""The `stablepipe` command, through the installed entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import shapes_data  # noqa: E402  (the demo model's caption checker)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "STABLEPIPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def stablepipe(*args, env, cwd=None):
    exe = shutil.which("stablepipe")
    assert exe, "the stablepipe entry point is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_generate_with_the_builtin_model_writes_png_with_settings(env, tmp_path):
    """No --model: the demo model draws what the caption says."""
    from stablepipe.builtin import DEMO_PROMPT

    out = tmp_path / "demo.png"
    run = stablepipe("generate", DEMO_PROMPT, "--seed", "7", "--steps", "20", "--out", str(out), env=env)
    assert run.returncode == 0, run.stderr
    assert "built-in demo model" in run.stderr and f"wrote {out} (seed 7)" in run.stdout
    image = PIL.Image.open(out)
    assert image.size == (32, 32)
    settings = json.loads(image.text["stablepipe"])
    assert settings["prompt"] == DEMO_PROMPT and settings["seed"] == 7 and settings["steps"] == 20
    assert image.text["parameters"].startswith(f"{DEMO_PROMPT}\nSteps: 20") and "Seed: 7" in image.text["parameters"]
    found = shapes_data.read_picture(np.asarray(image) / 255, "top left")
    assert (found["colour"], found["position"], found["background"]) == ("red", "top left", "gray"), found
    again = tmp_path / "again.png"
    stablepipe("generate", DEMO_PROMPT, "--seed", "7", "--steps", "20", "--out", str(again), env=env)
    assert np.array_equal(np.asarray(PIL.Image.open(again)), np.asarray(image))  # same seed, same image


def test_generate_json_several_images_and_scheduler_name(env, tmp_path):
    run = stablepipe(
        "generate", "a blue square", "--num-images", "2", "--seed", "3", "--steps", "2", "--width", "64",
        "--height", "32", "--scheduler", "DPM++ 2M Karras", "--out", str(tmp_path), "--json", env=env,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [f["seed"] for f in report["files"]] == [3, 4]
    assert report["settings"]["scheduler"] == "DPM++ 2M Karras"
    sizes = {PIL.Image.open(f["path"]).size for f in report["files"]}
    assert sizes == {(64, 32)}


def test_scheduler_list(env):
    run = stablepipe("generate", "--scheduler", "list", env=env)
    assert run.returncode == 0
    names = run.stdout.splitlines()
    assert {"Euler", "Euler a", "DPM++ 2M Karras", "DDIM"} <= set(names)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "30"], "width must be a positive multiple of 8"),
        (["--steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--scheduler", "Nope"], "Nope"),
        (["--model", "/no/such/folder-or-repo"], "error"),
        (["--num-images", "0"], "--num-images must be at least 1"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(env, tmp_path, args, message):
    run = stablepipe("generate", "x", "--steps", "1", "--out", str(tmp_path), *args, env=env)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip() and "No --model given" not in line]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("stablepipe generate: error:"), run.stderr


def test_every_subcommand_has_help(env):
    from stablepipe.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert "generate" in commands
    for name in commands:
        run = stablepipe(name, "--help", env=env)
        assert run.returncode == 0 and "usage: stablepipe " + name in run.stdout
