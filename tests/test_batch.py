"""`stablepipe batch` on one machine: checked job files, the same pictures as the single-image commands, and a
run killed with SIGKILL that `--resume` completes with every image exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from fixtures_image import sample_image, sample_mask
from fixtures_upscale import write_x4_folder

from stablepipe.batch import JobFileError, read_jobs
from stablepipe.batch.manifest import MANIFEST, read_records
from stablepipe.cli import main

MODEL_FLAGS = ["--dtype", "float32", "--device", "cpu", "--quiet"]


def write_jobs(folder: Path, lines: list[dict | str], name: str = "jobs.jsonl") -> Path:
    path = folder / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def done_records(out: Path) -> list[dict]:
    return [r for r in read_records(out / MANIFEST) if r["kind"] == "done"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "pictures").mkdir()
    sample_image(32, 32).save(folder / "pictures" / "photo.png")
    sample_mask(32, 32).save(folder / "pictures" / "mask.png")
    sample_image(8, 8, seed=3).save(folder / "pictures" / "small.png")
    return folder


@pytest.fixture(scope="module")
def x4_folder(tmp_path_factory) -> Path:
    return write_x4_folder(tmp_path_factory.mktemp("x4"))


# ---- the job file ------------------------------------------------------------------------------------------


def test_every_bad_line_is_named_with_its_field_before_anything_runs(inputs):
    path = write_jobs(inputs, [
        {"prompt": "fine"}, "{not json", {"prompt": "x", "steps": 0}, {"prompt": "x", "width": 30},
        {"prompt": "x", "sampler": "Eulerr"}, {"task": "img2img", "prompt": "x"},
        {"task": "inpaint", "prompt": "x", "image": "pictures/photo.png", "mask": "pictures/none.png"},
        {"prompt": "x", "colour": "red"}, {"prompt": "x", "seed": -1}, {"prompt": "x", "image": "pictures/photo.png"},
        {"task": "upscale", "image": "pictures/small.png", "width": 64}, [1, 2], {"prompt": "x", "guidance": True},
    ], name="bad.jsonl")
    with pytest.raises(JobFileError) as caught:
        read_jobs(path)
    lines = str(caught.value).splitlines()[1:]
    expected = [
        (2, "not valid JSON"), (3, "`steps` must be an integer >= 1, got 0"), (4, "`width` must be a positive "
        "multiple of 8"), (5, "`sampler`: unknown scheduler name 'Eulerr'"), (6, "`image` is missing"),
        (7, "`mask`: no file at"), (8, "unknown field `colour`"), (9, "`seed` must be an integer from 0"),
        (10, "`image` is not used by task 'txt2img'"), (11, "`width` is not used by task 'upscale'"),
        (12, "expected a JSON object"), (13, "`guidance` must be a number"),
    ]
    assert len(lines) == len(expected)
    for line, (number, message) in zip(lines, expected):
        assert line.startswith(f"bad.jsonl line {number}: ") and message in line, line


def test_ids_and_derived_seeds_are_stable_and_follow_the_settings(inputs):
    lines = [{"prompt": "a cat"}, {"prompt": "a dog", "seed": 7}, {"prompt": "a cat"}]
    first, again = read_jobs(write_jobs(inputs, lines)), read_jobs(write_jobs(inputs, lines))
    assert [(j.id, j.seed) for j in first] == [(j.id, j.seed) for j in again]
    assert first[1].seed == 7 and not first[1].seed_derived and first[0].seed_derived
    assert first[0].seed != first[2].seed  # the same prompt on another line is another picture
    assert [j.id[:6] for j in first] == ["000001", "000002", "000003"]
    changed = read_jobs(write_jobs(inputs, [{"prompt": "a cat", "steps": 5}, *lines[1:]]))
    assert changed[0].id != first[0].id and changed[1].id == first[1].id
    defaults = read_jobs(write_jobs(inputs, lines), defaults={"steps": 5})
    assert defaults[0].steps == 5 and defaults[0].id == changed[0].id
    upscale = {"task": "upscale", "image": "pictures/small.png"}  # the defaults a task cannot use are left out
    (job,) = read_jobs(write_jobs(inputs, [upscale]), defaults={"width": 64, "steps": 3})
    assert (job.width, job.steps) == (None, 3)


# ---- the pictures ------------------------------------------------------------------------------------------


def test_batch_draws_the_pictures_of_the_single_image_commands(sd1_folder, inputs, x4_folder, tmp_path):
    """txt2img (two batched, one alone with its own sampler), img2img, inpaint, upscale: each PNG has the pixels
    `generate` / `img2img` / `inpaint` / `upscale --x4` write for the same settings, and its A1111 infotext."""
    common = {"steps": 3, "guidance": 6.0}
    lines = [
        {"prompt": "a red circle", "seed": 11, **common}, {"prompt": "a blue square", "seed": 12, **common},
        {"prompt": "a green triangle", "seed": 13, "sampler": "DPM++ 2M Karras", "negative_prompt": "blur", **common},
        {"task": "img2img", "prompt": "a cat", "image": "pictures/photo.png", "strength": 0.7, "seed": 14, **common},
        {"task": "inpaint", "prompt": "a dog", "image": "pictures/photo.png", "mask": "pictures/mask.png", "seed": 15,
         **common},
        {"task": "upscale", "prompt": "sharp", "image": "pictures/small.png", "seed": 16, "steps": 3},
    ]
    jobs = write_jobs(inputs, lines)
    out = tmp_path / "batch"
    model = ["--model", str(sd1_folder), *MODEL_FLAGS]
    assert main(["batch", str(jobs), "--out", str(out), "--upscaler", str(x4_folder), *model]) == 0
    pic = str(inputs / "pictures")
    singles = [
        ["generate", "a red circle", "--seed", "11", *model], ["generate", "a blue square", "--seed", "12", *model],
        ["generate", "a green triangle", "--seed", "13", "--scheduler", "DPM++ 2M Karras", "--negative-prompt", "blur",
         *model],
        ["img2img", "a cat", "--image", f"{pic}/photo.png", "--strength", "0.7", "--seed", "14", *model],
        ["inpaint", "a dog", "--image", f"{pic}/photo.png", "--mask", f"{pic}/mask.png", "--seed", "15", *model],
        ["upscale", "--x4", f"{pic}/small.png", "--prompt", "sharp", "--seed", "16", "--model", str(x4_folder),
         *MODEL_FLAGS],
    ]
    written = sorted(out.glob("*.png"))
    assert len(written) == len(lines) and len(done_records(out)) == len(lines)
    for i, (command, path) in enumerate(zip(singles, written)):
        single = tmp_path / f"single{i}.png"
        steps = ["--steps", "3"] + (["--guidance", "6"] if command[0] != "upscale" else [])
        assert main([*command, *steps, "--out", str(single)]) == 0
        assert np.abs(pixels(single) - pixels(path)).max() == 0, command
        with PIL.Image.open(single) as alone, PIL.Image.open(path) as batched:
            assert batched.text["parameters"] == alone.text["parameters"], command  # the same infotext
    with PIL.Image.open(written[2]) as image:
        assert image.text["parameters"].startswith(
            "a green triangle\nNegative prompt: blur\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6"
            ", Seed: 13, Size: 32x32")
    assert pixels(written[5]).shape == (32, 32, 3)  # 8 x 8 upscaled 4 times


def test_ray_flag_without_ray_says_how_to_install_it(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    jobs = write_jobs(inputs, [{"prompt": "x"}])
    assert main(["batch", str(jobs), "--out", str(tmp_path), "--ray"]) == 2
    assert 'pip install "stablepipe[ray]"' in capsys.readouterr().err
    assert not (tmp_path / MANIFEST).exists()


# ---- killed and resumed --------------------------------------------------------------------------------------


def kill_when_done(command: list[str], out: Path, count: int, env: dict) -> int:
    """Start `command`, SIGKILL it once the manifest records `count` images; returns how many it had."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (out / MANIFEST).exists() and len(done_records(out)) >= count:
                break
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    return len(done_records(out))


def test_a_killed_run_resumes_with_exactly_the_missing_images(sd1_folder, inputs, tmp_path):
    lines = [{"prompt": f"picture {i}", "steps": 4} for i in range(10)]  # derived seeds
    jobs = write_jobs(inputs, lines)
    out = tmp_path / "killed"
    flags = ["--model", str(sd1_folder), *MODEL_FLAGS, "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done_before = kill_when_done([shutil.which("stablepipe"), "batch", str(jobs), "--out", str(out), *flags],
                                 out, 3, env)
    assert 3 <= done_before < len(lines)
    before = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in done_records(out)}
    (out / ".000009-0000000000.png.999.tmp").write_bytes(b"\x89PNG cut short")  # what a kill mid-write leaves
    assert main(["batch", str(jobs), "--out", str(out), *flags, "--resume", "--json"]) == 0
    records = done_records(out)
    assert sorted(r["line"] for r in records) == list(range(1, 11))  # every image once
    assert {p.name for p in out.iterdir()} == {MANIFEST, *(r["file"] for r in records)}  # no temp file left
    assert all((out / f).stat().st_mtime_ns == t for f, t in before.items())  # the done ones not redrawn
    straight = tmp_path / "straight"
    assert main(["batch", str(jobs), "--out", str(straight), *flags]) == 0
    for record in records:
        assert np.abs(pixels(out / record["file"]) - pixels(straight / record["file"])).max() == 0


def test_resume_redraws_damaged_files_and_adopts_unrecorded_whole_ones(sd1_folder, inputs, tmp_path, capsys):
    jobs = write_jobs(inputs, [{"prompt": f"picture {i}", "steps": 2, "seed": i} for i in range(3)])
    out = tmp_path / "out"
    flags = ["--model", str(sd1_folder), *MODEL_FLAGS, "--json"]
    assert main(["batch", str(jobs), "--out", str(out), *flags]) == 0
    first = json.loads(capsys.readouterr().out)
    damaged, unrecorded = Path(first["files"][0]["path"]), Path(first["files"][2]["path"])
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated behind the manifest's back
    manifest = (out / MANIFEST).read_text().splitlines()
    (out / MANIFEST).write_text("\n".join(manifest[:-1]) + '\n{"kind":"done","id":"000003')  # last record cut
    assert main(["batch", str(jobs), "--out", str(out), *flags]) == 2  # no --resume: refused
    assert "pass --resume" in capsys.readouterr().err
    assert main(["batch", str(jobs), "--out", str(out), *flags, "--resume"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["drawn"] == 1 and report["redrawn"] == [first["files"][0]["id"]]
    records = done_records(out)
    assert sorted(r["line"] for r in records) == [1, 2, 3]
    assert [r["file"] for r in records if r.get("adopted")] == [unrecorded.name]  # whole, so not drawn again
    assert PIL.Image.open(damaged).size == (32, 32)
