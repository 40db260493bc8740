"""Drawing a group of batch jobs: the loaded pipelines, and jobs in -> PNG files (bytes) out.

The same code runs in the one-machine runner and in each Ray worker, so both give the same bytes. Jobs
that share a UNet call go through `stablepipe.batching.run_batch` (one generator per request: each image is
the one its request gives alone); upscale jobs run one at a time on the x4 upscaler.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stablepipe.batch.jobs import BatchJob
from stablepipe.infotext import format_infotext
from stablepipe.model_flags import call_default


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model flags of `stablepipe batch` (as `stablepipe generate` takes them); picklable, for Ray."""

    model: str | None = None  # Hub id, folder or single file; None: the built-in model
    upscaler: str | None = None  # the x4 upscaler for `upscale` lines; None: the built-in tiny one
    variant: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    no_safety_checker: bool = False
    config: str | None = None
    lora: tuple[str, ...] = ()
    embedding: tuple[str, ...] = ()
    prompt_weighting: bool = False

    def namespace(self, model: str | None) -> argparse.Namespace:
        """The flags as `stablepipe.model_flags.load_pipeline_from_flags` reads them, for `model`."""
        return argparse.Namespace(**{**dataclasses.asdict(self), "model": model, "lora": list(self.lora),
                                     "embedding": list(self.embedding), "scheduler": None, "quiet": True,
                                     "json": False, "clip_skip": None})

    def identity(self) -> dict[str, Any]:
        """What decides the pictures, as the manifest records it (a resume must match it)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "device" and v not in (None, (), False)}


class Pipelines:
    """The pipelines of one worker, loaded on first use and kept: txt2img from --model, img2img and
    inpaint sharing its weights, the x4 upscaler from --upscaler."""

    def __init__(self, options: ModelOptions, say=lambda message: None):
        self.options, self.say = options, say
        self.loaded: dict[str, Any] = {}  # task -> pipeline
        self.settings: dict[str, dict[str, Any]] = {}  # task -> model_settings of its pipeline

    def __call__(self, task: str) -> Any:
        if task not in self.loaded:
            self.loaded[task] = self.load(task)
        return self.loaded[task]

    def load(self, task: str) -> Any:
        from stablepipe.model_flags import load_pipeline_from_flags
        from stablepipe.pipelines.img2img import StableDiffusionImg2ImgPipeline
        from stablepipe.pipelines.inpaint import StableDiffusionInpaintPipeline
        from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline
        from stablepipe.pipelines.upscale import StableDiffusionUpscalePipeline

        if task == "upscale":
            from stablepipe.builtin import builtin_upscaler_path

            upscaler = self.options.upscaler or str(builtin_upscaler_path("x4"))
            return load_pipeline_from_flags(StableDiffusionUpscalePipeline, self.options.namespace(upscaler), self.say)
        if task == "txt2img":
            flags = self.options.namespace(self.options.model)
            return load_pipeline_from_flags(StableDiffusionPipeline, flags, self.say)
        base = self("txt2img")
        cls = StableDiffusionImg2ImgPipeline if task == "img2img" else StableDiffusionInpaintPipeline
        pipe = cls(**base.components, **base.config)
        pipe.prompt_weighting = base.prompt_weighting
        return pipe

    def model_settings(self, task: str) -> dict[str, Any]:
        """Model, Model hash and the A1111 sampler names of the task's pipeline, as `generate` records them."""
        from stablepipe.infotext import model_name
        from stablepipe.model_flags import model_settings

        if task not in self.settings:
            source = self.options.upscaler if task == "upscale" else self.options.model
            settings = model_settings(self(task), source)
            self.settings[task] = {**settings, "model": model_name(settings["model"])}  # as the infotext names it
        return self.settings[task]


def open_picture(data: bytes, mode: str, size: tuple[int, int] | None):
    """A picture from its file's bytes, in `mode`, resized (Lanczos, as the CLI does) to `size` if given."""
    import PIL.Image

    picture = PIL.Image.open(io.BytesIO(data)).convert(mode)
    if size is not None and picture.size != size:
        picture = picture.resize(size, resample=PIL.Image.Resampling.LANCZOS)
    return picture


def image_request(job: BatchJob, pipe: Any, inputs: Mapping[str, bytes], prompt_weighting: bool):
    """The `stablepipe.batching.ImageRequest` of `job`, its unset settings filled from the pipeline's defaults."""
    from stablepipe.batching import ImageRequest

    height, width = pipe.default_size(job.height, job.width)
    pictures = {}
    if job.image:
        pictures["image"] = open_picture(inputs[job.image], "RGB", (width, height))
    if job.mask:
        pictures["mask"] = open_picture(inputs[job.mask], "L", (width, height))
    strength = job.strength if job.strength is not None else (
        call_default(pipe, "strength") if job.task != "txt2img" else 1.0)
    return ImageRequest(
        job.task, job.prompt, negative_prompt=job.negative_prompt or "", seed=job.seed, width=width, height=height,
        steps=job.steps or call_default(pipe, "num_inference_steps"), sampler=job.sampler,
        guidance=job.guidance if job.guidance is not None else call_default(pipe, "guidance_scale"),
        strength=strength, prompt_weighting=prompt_weighting, **pictures,
    )


def draw_group(pipes: Pipelines, jobs: Sequence[BatchJob], inputs: Mapping[str, bytes]) -> list[bytes]:
    """The PNG file of each job (one group: equal `batch_key()`s), with its A1111 infotext, in order."""
    from stablepipe.batching import infotext_params, run_batch

    if jobs[0].task == "upscale":
        return [draw_upscale(pipes, job, inputs) for job in jobs]
    pipe = pipes(jobs[0].task)
    requests = [image_request(job, pipe, inputs, pipes.options.prompt_weighting) for job in jobs]
    images = run_batch(pipes, requests)
    model = pipes.model_settings(jobs[0].task)
    files = []
    for image, request, job in zip(images, requests, jobs):
        params = infotext_params(request, model_name=model["model"], model_hash=model["model_hash"])
        if request.sampler is None:  # the model's own scheduler, by its A1111 names
            params.update({"Sampler": model["sampler"], "Schedule type": model["schedule_type"]})
        files.append(png_bytes(image, format_infotext(request.prompt, request.negative_prompt, params), job))
    return files


def draw_upscale(pipes: Pipelines, job: BatchJob, inputs: Mapping[str, bytes]) -> bytes:
    """An `upscale` line: the x4 upscaler, as `stablepipe upscale --x4` runs it."""
    import torch

    from stablepipe.batching import pipeline_with_sampler
    from stablepipe.infotext import a1111_params
    from stablepipe.schedulers.names import split_a1111_name

    pipe = pipeline_with_sampler(pipes("upscale"), job.sampler)
    kwargs = {"num_inference_steps": job.steps, "guidance_scale": job.guidance, "negative_prompt": job.negative_prompt}
    image = pipe(job.prompt, image=open_picture(inputs[job.image], "RGB", None),
                 generator=[torch.Generator().manual_seed(job.seed)],
                 **{k: v for k, v in kwargs.items() if v is not None}).images[0]
    model = pipes.model_settings("upscale")
    sampler, schedule = split_a1111_name(job.sampler) if job.sampler else (model["sampler"], model["schedule_type"])
    params = a1111_params(
        steps=job.steps or call_default(pipe, "num_inference_steps"), sampler=sampler, schedule_type=schedule,
        cfg_scale=job.guidance if job.guidance is not None else call_default(pipe, "guidance_scale"), seed=job.seed,
        width=image.width, height=image.height, model_hash=model["model_hash"], model=model["model"])
    return png_bytes(image, format_infotext(job.prompt, job.negative_prompt, params), job)


def png_bytes(image, infotext: str, job: BatchJob) -> bytes:
    """The PNG file of `image`: A1111's `parameters` text, and a `stablepipe` JSON text naming the request."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    info.add_text("stablepipe", json.dumps({"command": "batch", "id": job.id, "line": job.line, "seed": job.seed,
                                            "task": job.task}))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_inputs(jobs: Sequence[BatchJob]) -> dict[str, bytes]:
    """The bytes of every picture the jobs name (read by the driver, so workers need no shared disk)."""
    return {path: Path(path).read_bytes() for job in jobs for path in job.input_paths()}
