"""The denoising loop on its own: a fake UNet and scheduler, no pipeline."""

from __future__ import annotations

import pytest
import torch

from stablepipe.pipelines import denoising
from stablepipe.pipelines.denoising import ClassifierFreeGuidance, Conditioning, LoopHooks, NoGuidance


class FakeUNet:
    """Predicts `weight * x + embedding mean`, so each stacked copy gives its own, known prediction."""

    def __init__(self, weight: float = 0.5):
        self.weight, self.calls = weight, []

    def __call__(self, sample, t, *, encoder_hidden_states, return_dict=False, **kwargs):
        self.calls.append((sample.shape[0], float(t), dict(kwargs)))
        bias = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (self.weight * sample + bias,)


class FakeScheduler:
    """x_next = x - 0.1 * prediction; records what it was given."""

    order = 1

    def __init__(self):
        self.seen = []

    def scale_model_input(self, sample, t):
        return sample * 2

    def step(self, prediction, t, sample, return_dict=False, **kwargs):
        self.seen.append((prediction.clone(), kwargs))
        return (sample - 0.1 * prediction,)


def embeds(value: float, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, 3, 4), value)


def test_unguided_loop_runs_each_timestep_once_and_scales_the_input():
    unet, scheduler = FakeUNet(), FakeScheduler()
    latents = torch.ones(1, 2, 2, 2)
    out = denoising.denoise(unet, scheduler, latents, torch.tensor([3, 2, 1]), Conditioning(embeds(1.0)),
                            guider=NoGuidance())  # fmt: skip
    expected = latents
    for _ in range(3):
        expected = expected - 0.1 * (0.5 * (2 * expected) + 1.0)
    torch.testing.assert_close(out, expected)
    assert [c[0] for c in unet.calls] == [1, 1, 1] and [c[1] for c in unet.calls] == [3.0, 2.0, 1.0]


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_classifier_free_guidance_combines_the_two_halves(rescale):
    unet, scheduler = FakeUNet(), FakeScheduler()
    latents = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(embeds(1.0, 2), embeds(-1.0, 2))
    denoising.denoise(unet, scheduler, latents, torch.tensor([5]), cond, guider=ClassifierFreeGuidance(7.5, rescale))
    assert unet.calls[0][0] == 4  # (uncond, cond) stacked
    uncond, text = 0.5 * 2 * latents - 1.0, 0.5 * 2 * latents + 1.0
    guided = uncond + 7.5 * (text - uncond)
    if rescale:
        ratio = text.std(dim=(1, 2, 3), keepdim=True) / guided.std(dim=(1, 2, 3), keepdim=True)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    torch.testing.assert_close(scheduler.seen[0][0], guided)


def test_the_guider_is_chosen_in_one_place():
    assert isinstance(denoising.choose_guider(7.5), ClassifierFreeGuidance)
    assert isinstance(denoising.choose_guider(1.0), NoGuidance)
    assert isinstance(denoising.choose_guider(7.5, distilled=True), NoGuidance)
    assert denoising.choose_guider(7.5, distilled=True).scale == 7.5  # kept for the guidance embedding
    assert denoising.choose_guider(5.0, rescale=0.3).rescale == 0.3


def test_conditioning_and_guider_must_agree():
    with pytest.raises(ValueError, match="encode negative prompts exactly when the guider is guided"):
        denoising.denoise(FakeUNet(), FakeScheduler(), torch.ones(1, 2, 2, 2), torch.tensor([1]),
                          Conditioning(embeds(1.0)), guider=ClassifierFreeGuidance(7.5))  # fmt: skip


def test_interrupt_skips_the_remaining_steps():
    unet, calls = FakeUNet(), []

    def interrupted():
        calls.append(1)
        return len(calls) > 2

    denoising.denoise(unet, FakeScheduler(), torch.ones(1, 2, 2, 2), torch.tensor([4, 3, 2, 1]),
                      Conditioning(embeds(0.0)), guider=NoGuidance(), hooks=LoopHooks(interrupted=interrupted))  # fmt: skip
    assert len(unet.calls) == 2


def test_callbacks_may_replace_the_latents_and_embeddings():
    unet, scheduler = FakeUNet(), FakeScheduler()
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((pipe, i, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"]), "prompt_embeds": tensors["prompt_embeds"] + 1}

    hook = denoising.step_end_callback("the pipe", callback, ["latents", "prompt_embeds"])
    cond = Conditioning(embeds(1.0))
    out = denoising.denoise(unet, scheduler, torch.ones(1, 2, 2, 2), torch.tensor([2, 1]), cond,
                            guider=NoGuidance(), hooks=LoopHooks(on_step_end=hook))  # fmt: skip
    assert seen == [("the pipe", 0, ["latents", "prompt_embeds"]), ("the pipe", 1, ["latents", "prompt_embeds"])]
    assert torch.equal(out, torch.zeros_like(out))
    # the second UNet call saw the replaced embeddings: bias 2, latents 0
    torch.testing.assert_close(scheduler.seen[1][0], torch.full((1, 2, 2, 2), 2.0))


def test_after_step_hooks_run_in_order_and_the_legacy_callback_only_watches():
    order, watched = [], []
    hooks = LoopHooks(after_step=(
        lambda i, t, x: order.append(("blend", i)) or x * 0 + 5,
        denoising.legacy_step_callback(lambda step, t, x: watched.append((step, float(x.mean()))), 2,
                                       num_timesteps=3, num_inference_steps=3, order=1),
    ))  # fmt: skip
    out = denoising.denoise(FakeUNet(), FakeScheduler(), torch.ones(1, 2, 2, 2), torch.tensor([3, 2, 1]),
                            Conditioning(embeds(0.0)), guider=NoGuidance(), hooks=hooks)  # fmt: skip
    assert order == [("blend", 0), ("blend", 1), ("blend", 2)]
    assert watched == [(0, 5.0), (2, 5.0)]  # every callback_steps-th step, after the blend
    assert torch.equal(out, torch.full_like(out, 5.0))


def test_progress_counts_user_steps_for_second_order_schedulers():
    updates = []

    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            updates.append(n)

    scheduler = FakeScheduler()
    scheduler.order = 2
    denoising.denoise(FakeUNet(), scheduler, torch.ones(1, 2, 2, 2), torch.arange(5, 0, -1),
                      Conditioning(embeds(0.0)), guider=NoGuidance(), num_inference_steps=3,
                      progress=lambda total: Bar())  # fmt: skip
    assert len(updates) == 3  # 5 loop iterations (Heun: 1 + 2 * 2), 3 user steps


def test_non_finite_result_says_what_to_do():
    class NaNUNet(FakeUNet):
        def __call__(self, sample, t, **kwargs):
            return (torch.full_like(sample, float("nan")),)

    with pytest.raises(FloatingPointError, match="guidance_scale=30"):
        denoising.denoise(NaNUNet(), FakeScheduler(), torch.ones(1, 2, 2, 2), torch.tensor([1]),
                          Conditioning(embeds(0.0)), guider=NoGuidance(30))  # fmt: skip


def test_the_loop_reads_no_pipeline():
    import inspect
    import re

    for function in (denoising.denoise, denoising.predict):
        assert not any("pipe" in name for name in inspect.signature(function).parameters)
        assert not re.search(r"\b(pipe|self)\b", inspect.getsource(function))


def test_a_callback_may_change_the_guidance_and_switch_it_off():
    """Callbacks see the stacked embeddings (as in diffusers); after each, the loop asks `hooks.guider()` again."""
    unet, scheduler = FakeUNet(), FakeScheduler()
    state = {"guider": ClassifierFreeGuidance(3.0)}
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tensors["prompt_embeds"].shape[0])
        state["guider"] = state["guider"].with_scale(4.0 if i == 0 else 1.0)  # guidance off after step 1
        return tensors if i == 0 else {**tensors, "prompt_embeds": tensors["prompt_embeds"] + 1}

    hook = denoising.step_end_callback("the pipe", callback, ["prompt_embeds"])
    cond = Conditioning(embeds(1.0, 2), embeds(-1.0, 2))
    denoising.denoise(unet, scheduler, torch.ones(2, 2, 2, 2), torch.tensor([3, 2, 1]), cond, guider=state["guider"],
                      hooks=LoopHooks(on_step_end=hook, guider=lambda: state["guider"]))  # fmt: skip
    assert seen == [4, 4, 2]  # (uncond, cond) stacked twice, then the conditional batch alone
    assert [c[0] for c in unet.calls] == [4, 4, 2]
    assert cond.negative_prompt_embeds is None and float(cond.prompt_embeds.mean()) == 3.0  # +1 twice, cond half
    # step 2 was guided at the new scale 4: uncond + 4 (cond - uncond), embedding means -1 and 1
    x = torch.ones(2, 2, 2, 2)
    x = x - 0.1 * ((0.5 * 2 * x - 1) + 3.0 * 2)
    torch.testing.assert_close(scheduler.seen[1][0], (0.5 * 2 * x - 1) + 4.0 * 2)
    assert isinstance(state["guider"], NoGuidance) and state["guider"].scale == 1.0
