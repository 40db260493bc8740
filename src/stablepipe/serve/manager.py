"""The server's models: each loaded once, by name, with a pipeline per task built from its components
(`Pipeline(**pipe.components)`: shared weights, no copy). Clients choose among the loaded ones by name only."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch

from stablepipe.infotext import local_model_hash
from stablepipe.serve.config import BUILTIN, ModelSpec, ServeConfig

# model family -> task -> pipeline class name
TASK_CLASSES = {
    "sd": {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
           "inpaint": "StableDiffusionInpaintPipeline"},
    "sd-inpaint": {"inpaint": "StableDiffusionInpaintPipeline"},
    "sdxl": {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline"},
    "sdxl-inpaint": {"inpaint": "StableDiffusionXLInpaintPipeline"},
}


@dataclasses.dataclass
class LoadedModel:
    """One loaded checkpoint and the pipelines built from it, one per task it can do."""

    name: str
    source: str
    family: str  # a key of TASK_CLASSES
    pipelines: dict[str, Any]
    hash: str | None = None  # A1111's short model hash (infotext's "Model hash"); None where not local

    def pipeline(self, task: str) -> Any:
        if task not in self.pipelines:
            kind = "an inpainting model" if self.family.endswith("inpaint") else f"a {self.family} model"
            raise ValueError(f"model {self.name!r} is {kind}; it cannot do {task} (it does "
                             f"{', '.join(self.pipelines)}). Choose another with sd_model_checkpoint")
        return self.pipelines[task]

    @property
    def default_size(self) -> int:
        """The side (pixels) the model was trained at: its UNet's sample size times the VAE's scale."""
        pipe = next(iter(self.pipelines.values()))
        sample = pipe.unet.config.sample_size
        return (sample if isinstance(sample, int) else sample[0]) * pipe.vae_scale_factor


def torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def resolve_source(source: str, builtin_kind: str = "sd") -> str:
    """`builtin` -> the built-in model's folder (`builtin_kind` "sd": the demo model; "x4": the tiny x4 upscaler)."""
    if source != BUILTIN:
        return source
    from stablepipe.builtin import builtin_path

    return str(builtin_path(builtin_kind))


def read_pipeline(source: str, config: ServeConfig) -> Any:
    """Load a checkpoint (folder, Hub id or single file) on the config's device and dtype."""
    from stablepipe.loading.components import pipeline_class_name
    from stablepipe.pipelines.base import DiffusionPipeline, pipeline_class

    class_name = pipeline_class_name(source)
    cls = DiffusionPipeline if class_name is None else pipeline_class(class_name)
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(config.dtype)}
    if not config.safety_checker and class_name is not None and "safety_checker" in cls.component_names():
        kwargs["safety_checker"] = None
        if "requires_safety_checker" in cls._config_keys:  # the upscalers have no such setting
            kwargs["requires_safety_checker"] = False
    pipe = cls.from_single_file(source, **kwargs) if class_name is None else cls.from_pretrained(source, **kwargs)
    if not config.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # single files: the checker is dropped after loading
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(config.device)


def family_of(pipe: Any) -> str:
    """sd, sd-inpaint, sdxl or sdxl-inpaint, from the pipeline's components and UNet."""
    xl = hasattr(pipe, "text_encoder_2")
    if type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline" and not getattr(pipe, "text_encoder", None):
        raise ValueError("an SDXL refiner cannot serve on its own (it has no first text encoder); serve a base model")
    inpainting = pipe.unet.config.in_channels != pipe.vae.config.latent_channels
    return ("sdxl" if xl else "sd") + ("-inpaint" if inpainting else "")


def task_pipelines(pipe: Any, family: str) -> dict[str, Any]:
    """One pipeline per task, all sharing `pipe`'s weights."""
    from stablepipe.loading.components import shared_components
    from stablepipe.pipelines.base import pipeline_class

    built = {}
    for task, class_name in TASK_CLASSES[family].items():
        cls = pipeline_class(class_name)
        built[task] = pipe if type(pipe) is cls else cls(**shared_components(cls, pipe))
        built[task].set_progress_bar_config(disable=True)
    return built


class ModelManager:
    """The loaded models by name, which one is current (A1111's `sd_model_checkpoint`), and the upscaler."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.models: dict[str, LoadedModel] = {}
        self.upscaler: tuple[str, Any] | None = None
        self.current = config.models[0].label
        self._lock = threading.Lock()

    def load_all(self) -> None:
        for spec in self.config.models:
            self.load(spec)
        if self.config.upscaler is not None:
            self.load_upscaler(self.config.upscaler)

    def load(self, spec: ModelSpec) -> LoadedModel:
        source = resolve_source(spec.source)
        pipe = read_pipeline(source, self.config)
        family = family_of(pipe)
        model = LoadedModel(spec.label, spec.source, family, task_pipelines(pipe, family), local_model_hash(source))
        with self._lock:
            self.models[model.name] = model
        return model

    def load_upscaler(self, spec: ModelSpec) -> None:
        pipe = read_pipeline(resolve_source(spec.source, "x4"), self.config)
        if type(pipe).__name__ != "StableDiffusionUpscalePipeline":
            raise ValueError(f"--upscaler {spec.source} is a {type(pipe).__name__}, not the x4 upscaler "
                             "(e.g. stabilityai/stable-diffusion-x4-upscaler)")
        self.upscaler = (spec.name or "SD x4", pipe)

    def find(self, name: str) -> LoadedModel:
        """The loaded model called `name` (A1111's title or model name; case-insensitive), or a ValueError
        naming the loaded ones."""
        if name in self.models:
            return self.models[name]
        folded = {key.casefold(): model for key, model in self.models.items()}
        found = folded.get(str(name).strip().casefold())
        if found is None:
            raise ValueError(f"no model named {name!r} is loaded; loaded: {', '.join(self.models)}")
        return found

    def switch(self, name: str) -> str:
        """Make `name` the current model (no loading: only among the loaded ones)."""
        self.current = self.find(name).name
        return self.current
