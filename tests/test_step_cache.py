"""Step caching (DeepCache): the shallow step is exact on its own features, and a cached loop stays close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stablepipe
from stablepipe.pipelines.step_cache import StepCachedUNet


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    pipe.scheduler = stablepipe.DDIMScheduler.from_config(pipe.scheduler.config)  # one UNet call per step
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = 6):
    return pipe("a red circle", num_inference_steps=steps, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def test_shallow_step_on_its_own_deep_features_equals_the_full_unet(pipe):
    cached = StepCachedUNet(pipe.unet, 2)
    generator = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        full = cached(x, 500, text, return_dict=False)[0]
        shallow = cached(x, 500, text, return_dict=False)[0]  # the second call: the shallow path
        assert cached.calls == 2 and cached.deep is not None
        assert (shallow - full).abs().max().item() < 1e-5


def test_cached_loop_runs_the_deep_part_every_interval_and_stays_close(pipe):
    deep_calls = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda *args: deep_calls.append(1))
    try:
        plain = generate(pipe)
        assert len(deep_calls) == 6
        pipe.enable_step_cache(interval=2)
        cached = generate(pipe)
        assert len(deep_calls) == 6 + 3
        pipe.enable_step_cache(interval=3)
        generate(pipe)
        assert len(deep_calls) == 9 + 2
    finally:
        handle.remove()
        pipe.disable_step_cache()
    assert np.abs(cached - plain).max() > 0  # the picture changes (a random model's features change a lot)
    assert np.array_equal(generate(pipe), plain)  # and is back to the uncached one when switched off


def test_demo_model_picture_barely_changes():
    from stablepipe.builtin import DEMO_PROMPT, builtin_model_path

    demo = stablepipe.StableDiffusionPipeline.from_pretrained(builtin_model_path())
    demo.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=10, guidance_scale=3.0, output_type="np")
    plain = demo(DEMO_PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    demo.enable_step_cache(interval=2)
    cached = demo(DEMO_PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    assert 35 < psnr(cached, plain) < 100, psnr(cached, plain)  # measured: 49.8 dB at 20 steps


def test_interval_is_checked(pipe):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="interval must be an int >= 1"):
            pipe.enable_step_cache(interval=bad)
    pipe.enable_step_cache(interval=1)  # no caching
    try:
        assert pipe._step_cache_interval == 1
    finally:
        pipe.disable_step_cache()
