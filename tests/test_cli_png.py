"""The PNGs the command line writes: A1111's infotext in each, `--from-png` drawing the same picture again (from
stablepipe's PNGs and A1111's), names that never overwrite a file, atomic writes and Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import PIL.Image
import pytest
from PIL.PngImagePlugin import PngInfo

from stablepipe.builtin import DEMO_PROMPT
from stablepipe.cli import main
from stablepipe.infotext import model_hash, parse_infotext
from stablepipe.output_files import output_paths


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A stablepipe cache with the demo model, after one run (so every picture below comes from the same state)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STABLEPIPE_CACHE", str(folder))
        patch.setenv("HF_HUB_OFFLINE", "1")
        from stablepipe.builtin import builtin_model_path

        builtin = builtin_model_path()
        assert main(["generate", "warm-up", "--steps", "1", "--out", str(folder / "warm.png"), "--quiet"]) == 0
        yield folder, builtin


@pytest.fixture
def cli(cache, monkeypatch, capsys):
    monkeypatch.setenv("STABLEPIPE_CACHE", str(cache[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*args) -> tuple[int, str, str]:
        status = main([str(a) for a in args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def test_every_png_carries_a1111s_infotext_with_the_defaults(cli, cache, tmp_path):
    out = tmp_path / "a.png"
    status, _, err = cli("generate", DEMO_PROMPT, "--seed", 3, "--out", out, "--quiet")
    assert status == 0, err
    image = PIL.Image.open(out)
    expected_hash = model_hash(cache[1])
    assert image.text["parameters"] == (
        f"{DEMO_PROMPT}\nSteps: 50, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, Seed: 3, Size: 32x32, "
        f"Model hash: {expected_hash}, Model: builtin"
    )  # the pipeline's default steps and guidance are written too, and the scheduler by its A1111 name
    assert json.loads(image.text["stablepipe"])["steps"] == 50


def test_from_png_draws_the_same_picture_and_flags_win(cli, tmp_path):
    first = tmp_path / "first.png"
    status, _, err = cli("generate", DEMO_PROMPT, "--seed", 11, "--steps", 4, "--guidance", 3, "--negative-prompt",
                         "blue", "--scheduler", "DPM++ 2M Karras", "--clip-skip", 1, "--out", first, "--quiet")
    assert status == 0, err
    params = parse_infotext(PIL.Image.open(first).text["parameters"])
    assert (params["Sampler"], params["Schedule type"], params["Clip skip"], params["CFG scale"]) == (
        "DPM++ 2M", "Karras", "2", "3")
    again = tmp_path / "again.png"
    status, _, err = cli("generate", "--from-png", first, "--out", again, "--quiet")
    assert status == 0, err
    assert np.array_equal(pixels(again), pixels(first))  # the same prompt, settings and seed: the same picture
    assert PIL.Image.open(again).text["parameters"] == PIL.Image.open(first).text["parameters"]
    other = tmp_path / "other.png"
    status, _, err = cli("generate", "--from-png", first, "--seed", 12, "--out", other, "--quiet")
    params = parse_infotext(PIL.Image.open(other).text["parameters"])
    assert status == 0 and params["Seed"] == "12" and params["Steps"] == "4" and params["Negative prompt"] == "blue"
    assert not np.array_equal(pixels(other), pixels(first))


def test_from_png_reads_a1111s_png_and_reports_what_it_does_not_apply(cli, tmp_path):
    info = PngInfo()
    info.add_text("parameters", (
        f"{DEMO_PROMPT}\nNegative prompt: green\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, "
        "Seed: 9, Size: 32x32, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
        "Hires upscale: 2, Version: v1.10.1"))
    a1111 = tmp_path / "a1111.png"
    PIL.Image.new("RGB", (32, 32)).save(a1111, pnginfo=info)
    redrawn, direct = tmp_path / "redrawn.png", tmp_path / "direct.png"
    status, _, err = cli("generate", "--from-png", a1111, "--out", redrawn, "--quiet")
    assert status == 0
    assert "Hires upscale: 2" in err and "Model hash: 6ce0161689" in err and "the picture may differ" in err
    assert "Version" not in err  # a key that changes nothing is not reported
    status, _, err = cli("generate", DEMO_PROMPT, "--negative-prompt", "green", "--steps", 3, "--scheduler",
                         "DPM++ 2M Karras", "--guidance", 5, "--seed", 9, "--clip-skip", 1, "--prompt-weighting",
                         "--out", direct, "--quiet")  # A1111 always reads its prompt syntax
    assert status == 0, err
    assert np.array_equal(pixels(redrawn), pixels(direct))
    assert json.loads(PIL.Image.open(redrawn).text["stablepipe"])["from_png"] == str(a1111)


def test_new_names_never_collide(tmp_path):
    for name in ("00000-1.png", "00003-4.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in output_paths(str(tmp_path), [7, 8])] == ["00004-7.png", "00005-8.png"]
    (tmp_path / "00003-4.png").unlink()  # numbered past the highest left, not by a count that a deletion lowers
    assert [p.name for p in output_paths(str(tmp_path), [9])] == ["00001-9.png"]
    (tmp_path / "m-0.png").write_bytes(b"")
    assert [p.name for p in output_paths(str(tmp_path / "m.png"), [1, 2])] == ["m-1.png", "m-2.png"]
    assert [p.name for p in output_paths(str(tmp_path / "m.png"), [1, 2], overwrite=True)] == ["m-0.png", "m-1.png"]
    assert [p.name for p in output_paths(str(tmp_path / "d.png"), [1], companions=("-depth",))] == ["d.png"]
    (tmp_path / "d-depth.png").write_bytes(b"")
    with pytest.raises(Exception, match="d-depth.png: that file exists; pass --overwrite"):
        output_paths(str(tmp_path / "d.png"), [1], companions=("-depth",))


def test_an_existing_file_is_replaced_only_with_overwrite(cli, tmp_path):
    out = tmp_path / "mine.png"
    PIL.Image.new("RGB", (4, 4), (1, 2, 3)).save(out)
    before = out.read_bytes()
    status, _, err = cli("generate", "x", "--steps", 1, "--out", out, "--quiet")
    assert status == 2 and "that file exists; pass --overwrite" in err and out.read_bytes() == before
    status, _, err = cli("generate", "x", "--steps", 1, "--out", out, "--quiet", "--overwrite")
    assert status == 0 and PIL.Image.open(out).size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]  # no temporary file left


def test_convert_refuses_an_existing_target_unless_overwrite(cli, cache, tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep")
    status, _, err = cli("convert", cache[1], target)
    assert status == 2 and "that file exists; pass --overwrite" in err and target.read_bytes() == b"keep"
    status, _, err = cli("convert", cache[1], target, "--overwrite")
    assert status == 0 and target.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_ctrl_c_is_one_line_exit_130_and_no_file(cache, tmp_path):
    exe = shutil.which("stablepipe")
    assert exe, "the stablepipe entry point is not installed (pip install -e .)"
    out = tmp_path / "never.png"
    env = {**os.environ, "STABLEPIPE_CACHE": str(cache[0]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([exe, "generate", "x", "--steps", "1000", "--out", str(out)], env=env,
                               stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 240
    while "/1000" not in seen and time.monotonic() < deadline:  # denoising has started
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    lines = [line for line in (seen + rest).replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line
             and "/1000" not in line and not line.startswith("No --model given")]
    assert process.returncode == 130 and lines == ["stablepipe generate: interrupted"], seen + rest
    assert list(tmp_path.iterdir()) == []  # no picture, no temporary file
