"""The FastAPI app: AUTOMATIC1111's `/sdapi/v1` routes over the model manager, the run queue and the batcher.

    app = create_app(ServeConfig(models=(ModelSpec("builtin"),)))
    uvicorn.run(app, host="127.0.0.1", port=7861)

Everything the app holds hangs off `app.state.stablepipe` (a `Server`), built from the config alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from stablepipe.batching import ImageRequest, StepCallback
from stablepipe.infotext import parse_infotext
from stablepipe.schedulers.names import A1111_SCHEDULERS, COMFYUI_SCHEDULERS, SCHEDULE_TYPES, split_a1111_name
from stablepipe.serve import a1111, schemas
from stablepipe.serve import images as pictures
from stablepipe.serve.config import ServeConfig
from stablepipe.serve.errors import Unsupported
from stablepipe.serve.manager import ModelManager
from stablepipe.serve.middleware import BasicAuth, BodyLimit
from stablepipe.serve.queue import Job, QueueFull, RunQueue

X4_STEPS = 20  # the x4 upscaler's steps in extra-single-image (its seed is 0: the same input, the same output)
ERRORS = {
    401: {"description": "wrong or missing user:password (--api-auth)"},
    413: {"description": "the body is over the size limit"},
    422: {"description": "a field is wrong or cannot be honoured; `detail` names it"},
    503: {"description": "the queue is full (--max-queue); retry after `Retry-After` seconds"},
    504: {"description": "the request took longer than --timeout"},
}


class TimedOut(Exception):
    pass


class ClientGone(Exception):
    pass


class Server:
    """The state of one app: config, models, queue, options, and where saved images go."""

    def __init__(self, config: ServeConfig, manager: ModelManager | None = None):
        self.config = config
        if manager is None:
            manager = ModelManager(config)
            manager.load_all()
        self.manager = manager
        self.options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0,
                                        "samples_format": "png", "sd_checkpoint_hash": None}
        self.queue = RunQueue(lambda name: self.manager.find(name).pipeline, max_queue=config.max_queue,
                              max_batch=config.max_batch, batch_wait=config.batch_wait)
        self._saved = 0
        self._save_lock = threading.Lock()
        self.queue.start()

    def context(self) -> a1111.Context:
        return a1111.Context(self.config, self.manager, {**self.options, "sd_model_checkpoint": self.manager.current})

    def close(self) -> None:
        self.queue.stop()

    def set_options(self, given: dict[str, Any], *, prefix: str = "") -> None:
        """Options (checked by `schemas.Options`) set for the following requests; sd_model_checkpoint only
        switches among the loaded models."""
        given = dict(given)
        if given.pop("sd_checkpoint_hash", None) not in (None, self.options["sd_checkpoint_hash"]):
            raise Unsupported(prefix + "sd_checkpoint_hash", "read-only; choose the model with sd_model_checkpoint")
        if "sd_model_checkpoint" in given:
            name = given.pop("sd_model_checkpoint")
            self.manager.switch(a1111.find_model(name, self.context(), prefix + "sd_model_checkpoint").name)
        self.options.update(given)

    # ---- running ------------------------------------------------------------------------------------------

    async def run(self, request: Request, job: Job, deadline: float | None, *, bounded: bool = True) -> Job:
        """Queue `job` and wait for it; a client that goes away or a deadline that passes cancels it."""
        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        self.queue.submit(job, bounded=bounded)
        while not job.future.done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.queue.cancel(job)
                raise TimedOut()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.future), timeout=min(0.2, remaining or 0.2))
            if not job.future.done() and await request.is_disconnected():
                self.queue.cancel(job)
                raise ClientGone()
        if job.error is not None:
            raise job.error
        return job

    async def draw(self, request: Request, requests: list[ImageRequest], deadline: float | None, *,
                   bounded: bool = True) -> Job:
        return await self.run(request, Job(list(requests)), deadline, bounded=bounded)

    def deadline(self) -> float | None:
        return None if self.config.timeout is None else time.monotonic() + self.config.timeout

    def save(self, png: bytes, seed: int) -> None:
        """Write a PNG under --out with a generated name (date folder, counter, seed): never a client's path."""
        folder = Path(self.config.out_dir) / time.strftime("%Y-%m-%d")
        with self._save_lock:
            folder.mkdir(parents=True, exist_ok=True)
            self._saved += 1
            path = folder / f"{time.strftime('%H%M%S')}-{self._saved:05d}-{seed}.png"
        path.write_bytes(png)


def create_app(config: ServeConfig, *, manager: ModelManager | None = None) -> FastAPI:
    """The app for `config` (models loaded now, unless a loaded `manager` is given; its worker thread runs
    until the app shuts down)."""
    server = Server(config, manager)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="stablepipe", version="1", lifespan=lifespan,
                  description="AUTOMATIC1111-compatible API (/sdapi/v1) served by stablepipe.")
    app.state.stablepipe = server
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_auth:
        app.add_middleware(BasicAuth, users=config.api_auth)
    add_error_handlers(app)
    add_generation_routes(app, server)
    add_info_routes(app, server)
    add_control_routes(app, server)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Unsupported)
    async def unsupported(request: Request, err: Unsupported):
        return JSONResponse({"detail": err.detail()}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(TimedOut)
    async def timed_out(request: Request, err: TimedOut):
        limit = request.app.state.stablepipe.config.timeout
        return JSONResponse({"detail": f"the request took longer than {limit} s (--timeout)"}, status_code=504)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, err: ClientGone):
        return JSONResponse({"detail": "the client closed the connection"}, status_code=499)


# ---- txt2img, img2img ---------------------------------------------------------------------------------------


def add_generation_routes(app: FastAPI, server: Server) -> None:
    @app.post("/sdapi/v1/txt2img", response_model=schemas.ImageResponse, responses=ERRORS)
    async def txt2img(req: schemas.Txt2ImgRequest, request: Request):
        """Text to image (A1111's fields); `enable_hr` draws the hires fix."""
        plan = a1111.txt2img_plan(req, server.context())
        check_saving(server, req)
        keep_overrides(server, req)
        deadline = server.deadline()
        job = await draw_plan(server, request, plan.requests, deadline)
        if plan.hires is not None and not job.interrupted:
            first = [image for image in job.images if image is not None]
            second = await run_in_threadpool(a1111.hires_requests, plan, first)
            job = await draw_plan(server, request, second, deadline, bounded=False)  # infotext: 1st pass
        return await respond(server, plan, req, job)

    @app.post("/sdapi/v1/img2img", response_model=schemas.ImageResponse, responses=ERRORS)
    async def img2img(req: schemas.Img2ImgRequest, request: Request):
        """Image to image; with `mask`, inpainting (white is repainted)."""
        plan = await run_in_threadpool(a1111.img2img_plan, req, server.context())
        check_saving(server, req)
        keep_overrides(server, req)
        job = await draw_plan(server, request, plan.requests, server.deadline())
        return await respond(server, plan, req, job)

    @app.post("/sdapi/v1/extra-single-image", response_model=schemas.ExtrasSingleImageResponse, responses=ERRORS)
    async def extra_single_image(req: schemas.ExtrasSingleImageRequest, request: Request):
        """Upscale one image: the x4 upscaler (when the server has one, see /upscalers), Lanczos or Nearest."""
        work, info = await run_in_threadpool(upscale_work, server, req)
        job = await server.run(request, Job([], work=work), server.deadline())
        image = await run_in_threadpool(pictures.encode_png, job.result, info)
        return {"html_info": info, "image": image if req.show_extras_results else None}


def keep_overrides(server: Server, req: schemas.GenerationRequest) -> None:
    """`override_settings_restore_afterwards: false`: the overrides stay set for later requests (A1111's rule)."""
    if req.override_settings and not req.override_settings_restore_afterwards:
        server.set_options({k: v for k, v in req.override_settings.items() if v is not None},
                           prefix="override_settings.")


def check_saving(server: Server, req: schemas.GenerationRequest) -> None:
    if req.save_images and not server.config.out_dir:
        raise Unsupported("save_images", "this server saves no images (it was started without --out)")


async def draw_plan(server: Server, request: Request, requests: list[ImageRequest], deadline: float | None, *,
                    bounded: bool = True) -> Job:
    """The job drawing `requests`; a pipeline's own check on its input is a 422."""
    try:
        return await server.draw(request, requests, deadline, bounded=bounded)
    except ValueError as err:
        raise Unsupported("request", str(err)) from None


async def respond(server: Server, plan: a1111.Plan, req: schemas.GenerationRequest, job: Job) -> dict[str, Any]:
    drawn = [(r, image) for r, image in zip(plan.requests, job.images) if image is not None]
    plan.requests = [r for r, _ in drawn] or plan.requests[:1]
    images = await run_in_threadpool(a1111.finish_images, plan, [image for _, image in drawn])
    infotexts = [a1111.infotext_for(plan, r) for r, _ in drawn]
    pngs = await run_in_threadpool(lambda: [pictures.png_bytes(i, t) for i, t in zip(images, infotexts)])
    if req.save_images:
        for png, (r, _) in zip(pngs, drawn):
            server.save(png, r.seed)
    parameters = req.model_dump()
    if "init_images" in parameters:  # A1111 leaves the input images out of the echo
        parameters.update(init_images=None, mask=None)
    return {"images": [base64.b64encode(p).decode("ascii") for p in pngs] if req.send_images else [],
            "parameters": parameters, "info": a1111.info_json(plan, req, infotexts)}


def upscale_work(server: Server, req: schemas.ExtrasSingleImageRequest) -> tuple[Any, str]:
    """(work for the queue, its infotext) for extra-single-image, every field checked first."""
    a1111.refuse_unless(req.gfpgan_visibility == 0, "gfpgan_visibility", "face restoration is not supported; use 0")
    a1111.refuse_unless(req.codeformer_visibility == 0, "codeformer_visibility", "face restoration is not "
                        "supported; use 0")
    a1111.refuse_unless(req.upscaler_2 == "None" or req.extras_upscaler_2_visibility == 0, "upscaler_2",
                        "a second upscaler is not supported; use 'None' or visibility 0")
    names = upscaler_names(server)
    a1111.refuse_unless(req.upscaler_1 in names, "upscaler_1", f"{req.upscaler_1!r} is not available; this server "
                        f"has {', '.join(names)}" + ("" if server.manager.upscaler else " (start it with --upscaler "
                                                     "for the x4 upscaler)"))
    limit = server.config.max_pixels or 4096 * 4096
    x4 = server.manager.upscaler is not None and req.upscaler_1 == server.manager.upscaler[0]
    image = pictures.decode_image(req.image, "image", max_pixels=limit if x4 else 16 * limit).convert("RGB")
    size = upscale_size(req, image)
    a1111.refuse_unless(size[0] * size[1] <= 16 * limit, "upscaling_resize", f"{size[0]}x{size[1]} is over this "
                        f"server's limit of {16 * limit} pixels")
    info = f"Postprocess upscale to: {size[0]}x{size[1]}, Postprocess upscaler: {req.upscaler_1}"

    def work(callback: StepCallback) -> PIL.Image.Image:
        if req.upscaler_1 == "None":
            return image
        big = x4_upscale(server.manager.upscaler[1], image, callback) if x4 else image
        resample = PIL.Image.Resampling.NEAREST if req.upscaler_1 == "Nearest" else PIL.Image.Resampling.LANCZOS
        if big.size == size:
            return big
        crop = req.resize_mode == 1 and req.upscaling_crop
        return pictures.fit_pil(big, *size, cover=True) if crop else big.resize(size, resample)

    return work, info


def upscale_size(req: schemas.ExtrasSingleImageRequest, image: PIL.Image.Image) -> tuple[int, int]:
    if req.resize_mode == 1:
        return req.upscaling_resize_w, req.upscaling_resize_h
    return max(1, round(image.width * req.upscaling_resize)), max(1, round(image.height * req.upscaling_resize))


def x4_upscale(pipe, image: PIL.Image.Image, callback: StepCallback) -> PIL.Image.Image:
    """The x4 upscaler with an empty prompt, X4_STEPS steps and seed 0."""
    def on_step(step: int, t, latents) -> None:
        if callback(step + 1, X4_STEPS):
            pipe._interrupt = True

    generator = torch.Generator().manual_seed(0)
    return pipe(prompt="", image=image, num_inference_steps=X4_STEPS, generator=generator, callback=on_step).images[0]


def upscaler_names(server: Server) -> list[str]:
    x4 = [server.manager.upscaler[0]] if server.manager.upscaler else []
    return ["None", "Lanczos", "Nearest", *x4]


# ---- lists, options, PNG info -------------------------------------------------------------------------------


def add_info_routes(app: FastAPI, server: Server) -> None:
    @app.get("/sdapi/v1/sd-models", response_model=list[schemas.SDModelItem], responses=ERRORS)
    async def sd_models():
        """The loaded models (choose one with the sd_model_checkpoint option)."""
        return [{"title": name, "model_name": name, "filename": name} for name in server.manager.models]

    @app.get("/sdapi/v1/samplers", response_model=list[schemas.SamplerItem], responses=ERRORS)
    async def samplers():
        return sampler_items()

    @app.get("/sdapi/v1/schedulers", response_model=list[schemas.SchedulerItem], responses=ERRORS)
    async def schedulers():
        return [{"name": name.lower(), "label": name, "aliases": None, "default_rho": 7.0 if name == "Karras" else
                 None, "need_inner_model": False} for name in SCHEDULE_TYPES]

    @app.get("/sdapi/v1/upscalers", response_model=list[schemas.UpscalerItem], responses=ERRORS)
    async def upscalers():
        return [{"name": name, "scale": 4 if i == 3 else None} for i, name in enumerate(upscaler_names(server))]

    @app.get("/sdapi/v1/scripts", responses=ERRORS)
    async def scripts() -> dict[str, list[str]]:
        """No scripts: the lists are empty (clients check them for extensions)."""
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options", responses=ERRORS)
    async def get_options() -> dict[str, Any]:
        return server.context().options

    @app.post("/sdapi/v1/options", responses=ERRORS)
    async def set_options(options: schemas.Options) -> None:
        """Set options; sd_model_checkpoint switches among the loaded models (nothing is loaded from disk)."""
        server.set_options(options.model_dump(exclude_none=True))

    @app.post("/sdapi/v1/png-info", response_model=schemas.PNGInfoResponse, responses=ERRORS)
    async def png_info(req: schemas.PNGInfoRequest):
        """The settings a PNG carries: its `parameters` infotext, parsed as A1111 does."""
        image = pictures.decode_image(req.image, "image", max_pixels=16 * (server.config.max_pixels or 4096 ** 2))
        text = image.info.get("parameters", "")
        text = text if isinstance(text, str) else ""
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


def sampler_items() -> list[dict[str, Any]]:
    """A1111's sampler names (schedule types apart), with the ComfyUI names for the same sampler as aliases."""
    items = []
    for name, entry in A1111_SCHEDULERS.items():
        if split_a1111_name(name)[1] not in ("Automatic", "Uniform"):
            continue
        aliases = [comfy for comfy, other in COMFYUI_SCHEDULERS.items() if other is entry]
        items.append({"name": name, "aliases": aliases, "options": {}})
    return items


# ---- progress, interrupt, skip --------------------------------------------------------------------------------


def add_control_routes(app: FastAPI, server: Server) -> None:
    @app.get("/sdapi/v1/progress", response_model=schemas.ProgressResponse, responses=ERRORS)
    async def progress(skip_current_image: bool = False):
        """The running call's progress (0..1), its estimated seconds left, and A1111's state fields."""
        p = server.queue.progress
        running = bool(p.started)
        state = {"skipped": p.skipped, "interrupted": p.interrupted, "job": "txt2img" if running else "",
                 "job_count": p.job_count if running else 0, "job_timestamp": p.job_timestamp, "job_no": p.job_no,
                 "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps}
        return {"progress": p.fraction if running else 0.0, "eta_relative": p.eta, "state": state}

    @app.post("/sdapi/v1/interrupt", responses=ERRORS)
    async def interrupt() -> None:
        """Stop the running call; its requests answer with the images as far as they got."""
        server.queue.interrupt()

    @app.post("/sdapi/v1/skip", responses=ERRORS)
    async def skip() -> None:
        """Stop the running call; the other images of its requests still run."""
        server.queue.skip()
