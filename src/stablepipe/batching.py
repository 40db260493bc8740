"""Requests for one image each, grouped into batches that share a UNet call, and run as one pipeline call.

The one place where a request becomes a pipeline call, for every front end (the HTTP API, batch jobs, Ray).
Each request carries its own seed; a batch passes one generator per request (`generator=[...]`), and the
pipelines draw every random number per generator in diffusers' order (initial noise, the VAE's sample, an
ancestral sampler's noise), so each image is the one that request gives alone.

    requests = [ImageRequest("txt2img", "a red circle", seed=s, width=32, height=32, steps=4) for s in (1, 2, 3)]
    for group in group_requests(requests, max_batch=4):
        images = run_batch(lambda task: pipe, group)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import PIL.Image
import torch

from stablepipe.infotext import format_infotext
from stablepipe.schedulers.names import scheduler_from_name, split_a1111_name

TASKS = ("txt2img", "img2img", "inpaint")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit value

# callback(steps_done, steps_total) after every denoising step; returning True stops the batch there (the
# images are decoded from the latents reached, as A1111's interrupt and skip do)
StepCallback = Callable[[int, int], bool | None]
PipeForTask = Callable[[str], Any]  # task -> the loaded pipeline for that task (txt2img, img2img, inpaint)


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """Everything that decides one image. `seed` is already resolved (A1111's -1 is replaced by the caller)."""

    task: str  # "txt2img", "img2img" or "inpaint"
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    width: int = 512
    height: int = 512
    steps: int = 20
    sampler: str | None = None  # an A1111 / ComfyUI name ("DPM++ 2M Karras", "euler"); None: the model's own
    guidance: float = 7.0  # classifier-free guidance scale (A1111's cfg_scale)
    strength: float = 0.75  # img2img / inpaint: how much of the image is repainted (denoising_strength)
    image: PIL.Image.Image | None = dataclasses.field(default=None, compare=False)  # width x height, RGB
    mask: PIL.Image.Image | None = dataclasses.field(default=None, compare=False)  # inpaint: white is repainted
    clip_skip: int | None = None  # diffusers' clip_skip (A1111's "Clip skip" minus one); None: the last layer
    eta: float = 0.0  # DDIM's eta
    inpaint_padding: int | None = None  # inpaint the masked area's crop with this margin (A1111's "only masked")
    prompt_weighting: bool = False  # read A1111's prompt syntax, (word:1.3), [word], BREAK
    model: str = ""  # which loaded model draws it (the caller's name for it)

    def __post_init__(self) -> None:
        check_request(self)

    def batch_key(self) -> Hashable:
        """Requests with equal keys can share one pipeline call. An empty negative prompt is part of the key:
        SDXL guides with zeros for it (`force_zeros_for_empty_prompt`, as diffusers and A1111), only when the
        whole call has none. A crop-inpaint request (`inpaint_padding`) crops around its own mask, so it never
        shares (its key is unique)."""
        per_image = ("prompt", "negative_prompt", "seed")
        fields = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare and f.name not in per_image)
        fields += (not self.negative_prompt,)
        return (fields, id(self)) if self.inpaint_padding is not None else fields


def check_request(request: ImageRequest) -> None:
    """A ValueError naming the field for a request no pipeline can run."""
    if request.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {request.task!r}")
    if not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (resolve -1 to a random seed first), "
                         f"got {request.seed!r}")
    if not isinstance(request.steps, int) or request.steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {request.steps!r}")
    for name in ("width", "height"):
        value = getattr(request, name)
        if not isinstance(value, int) or value <= 0 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
    if request.task != "txt2img":
        if not 0.0 <= request.strength <= 1.0:
            raise ValueError(f"strength must be from 0 to 1, got {request.strength!r}")
        check_picture(request, "image")
    if request.task == "inpaint":
        check_picture(request, "mask")


def check_picture(request: ImageRequest, name: str) -> None:
    picture = getattr(request, name)
    if not isinstance(picture, PIL.Image.Image):
        raise ValueError(f"a {request.task} request needs `{name}` as a PIL image, got {type(picture).__name__}")
    if picture.size != (request.width, request.height):
        raise ValueError(f"`{name}` is {picture.width}x{picture.height}, the request is {request.width}x"
                         f"{request.height}; resize it to the request's size first")


def group_requests(requests: Sequence[ImageRequest], max_batch: int) -> list[list[ImageRequest]]:
    """The requests in groups of at most `max_batch` with equal `batch_key()`s; groups in the order of their
    first request, requests in their own order within a group."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    open_groups: dict[Hashable, list[ImageRequest]] = {}
    groups: list[list[ImageRequest]] = []
    for request in requests:
        key = request.batch_key()
        group = open_groups.get(key)
        if group is None or len(group) >= max_batch:
            group = open_groups[key] = []
            groups.append(group)
        group.append(request)
    return groups


def pipeline_with_sampler(pipe: Any, sampler: str | None) -> Any:
    """A pipeline of `pipe`'s class sharing its weights, with a fresh scheduler: the one `sampler` names
    (built from `pipe`'s scheduler config), or a new copy of `pipe`'s own. The scheduler holds the run's
    state, so every run gets its own and `pipe` is never changed."""
    config = dict(pipe.scheduler.config)
    scheduler = scheduler_from_name(sampler, config) if sampler else type(pipe.scheduler).from_config(config)
    components = {**pipe.components, **pipe.config, "scheduler": scheduler}
    built = type(pipe)(**components)
    built.set_progress_bar_config(disable=True)
    return built


def pipeline_kwargs(requests: Sequence[ImageRequest]) -> dict[str, Any]:
    """The keyword arguments of the one pipeline call that draws every request's image."""
    first = requests[0]
    kwargs: dict[str, Any] = {
        "prompt": [r.prompt for r in requests],
        "negative_prompt": None if not first.negative_prompt else [r.negative_prompt for r in requests],
        "num_inference_steps": first.steps, "guidance_scale": first.guidance, "clip_skip": first.clip_skip,
        "generator": [torch.Generator().manual_seed(r.seed) for r in requests], "eta": first.eta,
    }
    if first.task == "txt2img":
        kwargs.update(width=first.width, height=first.height)
    else:
        kwargs.update(image=[r.image for r in requests], strength=first.strength)
    if first.task == "inpaint":
        kwargs.update(mask_image=[r.mask for r in requests], width=first.width, height=first.height)
    if first.inpaint_padding is not None:  # one request (see batch_key): the crop takes one image and mask
        kwargs.update(image=first.image, mask_image=first.mask, padding_mask_crop=first.inpaint_padding)
    return kwargs


def run_batch(
    pipe_for_task: PipeForTask, requests: Sequence[ImageRequest], *, callback: StepCallback | None = None
) -> list[PIL.Image.Image]:
    """One pipeline call for `requests` (all with the same `batch_key()`); their images, in order."""
    if not requests:
        return []
    if len({r.batch_key() for r in requests}) > 1:
        raise ValueError("run_batch takes requests that can share a pipeline call (equal batch_key()); "
                         "split them with group_requests() first")
    first = requests[0]
    pipe = pipeline_with_sampler(pipe_for_task(first.task), first.sampler)
    pipe.prompt_weighting = first.prompt_weighting
    kwargs = pipeline_kwargs(requests)
    if callback is not None:
        kwargs["callback_on_step_end"] = step_callback(callback)
    return list(pipe(**kwargs).images)


def step_callback(callback: StepCallback) -> Callable:
    """`callback(done, total)` as diffusers' `callback_on_step_end`; True from it interrupts the pipeline."""

    def on_step_end(pipe, i: int, t, tensors: dict[str, Any]) -> dict[str, Any]:
        if callback(i + 1, pipe.num_timesteps):
            pipe._interrupt = True
        return tensors

    return on_step_end


def infotext_params(request: ImageRequest, *, model_name: str | None = None,
                    model_hash: str | None = None) -> dict[str, Any]:
    """The settings of `request`'s image as A1111's infotext writes them, in its order."""
    sampler, schedule = split_a1111_name(request.sampler) if request.sampler else (None, None)
    repaints = request.task != "txt2img"
    return {
        "Steps": request.steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": request.guidance,
        "Seed": request.seed, "Size": f"{request.width}x{request.height}", "Model hash": model_hash,
        "Model": model_name or request.model or None,
        "Denoising strength": request.strength if repaints else None,
        "Clip skip": request.clip_skip + 1 if request.clip_skip else None,
        "Inpaint area": None if request.inpaint_padding is None else "Only masked",
        "Masked area padding": request.inpaint_padding,
    }


def request_infotext(request: ImageRequest, **model: str | None) -> str:
    """The A1111 infotext of `request`'s image (`model_name`, `model_hash` as `infotext_params` takes them)."""
    return format_infotext(request.prompt, request.negative_prompt, infotext_params(request, **model))
