"""The request batcher: a batch of requests gives each request exactly the image it gives alone."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from stablepipe.batching import ImageRequest, group_requests, infotext_params, request_infotext, run_batch
from stablepipe.infotext import parse_infotext


@pytest.fixture(scope="module")
def pipes(sd1_folder):
    from stablepipe.pipelines.img2img import StableDiffusionImg2ImgPipeline
    from stablepipe.pipelines.inpaint import StableDiffusionInpaintPipeline
    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(sd1_folder)
    by_task = {"txt2img": base, "img2img": StableDiffusionImg2ImgPipeline(**base.components),
               "inpaint": StableDiffusionInpaintPipeline(**base.components)}
    return by_task.__getitem__


def picture(seed: int, size: int = 32, *, mask: bool = False) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    if mask:
        pixels = np.zeros((size, size), np.uint8)
        pixels[: size // 2, seed % size :] = 255
        return PIL.Image.fromarray(pixels, mode="L")
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def requests_for(task: str, sampler: str) -> list[ImageRequest]:
    prompts = ["a red circle", "a blue square, top left", "the green triangle"]
    extra = lambda i: {}  # noqa: E731
    if task != "txt2img":
        extra = lambda i: {"image": picture(i), "strength": 0.6, **({"mask": picture(i + 5, mask=True)}  # noqa: E731
                                                                    if task == "inpaint" else {})}
    return [ImageRequest(task, p, negative_prompt="blurry" if i == 1 else "dark", seed=100 + 7 * i, width=32,
                         height=32, steps=4, sampler=sampler, guidance=6.0, **extra(i))
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("task, sampler", [
    ("txt2img", "Euler a"), ("txt2img", "DPM++ 2M SDE Karras"), ("txt2img", "DDIM"), ("txt2img", None),
    ("img2img", "Euler a"), ("inpaint", "DPM2 a"),
])
def test_batched_images_equal_the_images_drawn_alone(pipes, task, sampler):
    requests = requests_for(task, sampler)
    batched = run_batch(pipes, requests)
    alone = [run_batch(pipes, [r])[0] for r in requests]
    for together, single in zip(batched, alone):
        diff = np.abs(np.asarray(together, np.int16) - np.asarray(single, np.int16))
        # measured: txt2img 0; img2img and inpaint at most 1 level (float rounding differs in batched convolutions)
        assert diff.max() <= 1, diff.max()
    assert np.asarray(batched[0]).std() > 1  # a picture, not a blank


def test_each_image_is_its_seed_and_prompt(pipes):
    """Swapping two requests in the batch swaps their images: nothing leaks between requests."""
    a, b, c = requests_for("txt2img", "Euler a")
    first, second = run_batch(pipes, [a, b, c]), run_batch(pipes, [c, a, b])
    assert [np.array_equal(x, y) for x, y in zip(first, [second[1], second[2], second[0]])] == [True] * 3
    assert not np.array_equal(first[0], first[1])


def test_grouping_keeps_order_and_splits_by_key_and_size():
    def req(seed, steps=4, **kw):
        return ImageRequest("txt2img", "x", seed=seed, width=32, height=32, steps=steps, **kw)

    requests = [req(1), req(2, steps=5), req(3), req(4), req(5, steps=5), req(6, sampler="Euler a"),
                req(7, negative_prompt="dark")]  # an empty negative prompt is SDXL's zeros: not shared with text
    groups = group_requests(requests, max_batch=2)
    assert [[r.seed for r in g] for g in groups] == [[1, 3], [2, 5], [4], [6], [7]]
    assert [[r.seed for r in g] for g in group_requests(requests, max_batch=1)] == [[s] for s in range(1, 8)]


def test_crop_inpaint_requests_never_share_a_call():
    shared = dict(image=picture(0), mask=picture(1, mask=True), width=32, height=32, inpaint_padding=4)
    a, b = ImageRequest("inpaint", "x", seed=1, **shared), ImageRequest("inpaint", "x", seed=2, **shared)
    assert len(group_requests([a, b], max_batch=8)) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="upscale"), "task must be one of"),
    (dict(seed=-1), "resolve -1"),
    (dict(width=30), "width must be a positive multiple of 8"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(task="img2img"), "needs `image`"),
    (dict(task="img2img", image=picture(0, 16)), "resize it"),
    (dict(task="img2img", image=picture(0), strength=1.5), "strength must be from 0 to 1"),
])
def test_bad_requests_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageRequest(**{"task": "txt2img", "prompt": "x", "width": 32, "height": 32, **kwargs})


def test_infotext_is_a1111s_and_reads_back():
    request = ImageRequest("img2img", "a castle, at night", negative_prompt="fog", seed=7, width=32, height=48,
                           steps=12, sampler="DPM++ 2M Karras", guidance=7.0, strength=0.5, image=picture(0, 32)
                           .resize((32, 48)), clip_skip=1)
    assert list(infotext_params(request, model_name="demo"))[:8] == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model"]
    text = request_infotext(request, model_name="demo")
    assert text.splitlines()[-1] == ("Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, "
                                     "Size: 32x48, Model: demo, Denoising strength: 0.5, Clip skip: 2")
    parsed = parse_infotext(text)
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Size-2"]) == ("a castle, at night", "fog", 48)
