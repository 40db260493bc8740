"""`DiffusionPipeline`: loading, components, `.to()`, saving and progress, shared by every pipeline."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from stablepipe.loading import components as component_loading
from stablepipe.loading.dtypes import resolve_dtype, resolve_dtypes
from stablepipe.loading.files import fetch_file, is_local
from stablepipe.loading.lora import LoraLoaderMixin
from stablepipe.loading.textual_inversion import TextualInversionLoaderMixin
from stablepipe.outputs import BaseOutput
from stablepipe.image import numpy_to_pil
from stablepipe.pipelines.call import DenoisingCallMixin
from stablepipe.pipelines.image_processor import VaeImageProcessor
from stablepipe.pipelines.ip_adapter import image_projection_layers
from stablepipe.pipelines.memory import MemoryOptionsMixin
from stablepipe.pipelines.registry import PIPELINE_MODULES
from stablepipe.pipelines.vae_codec import scale_factor


@dataclasses.dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """`images`: PIL images, an array (B, H, W, C), a tensor (B, C, H, W) or latents;
    `nsfw_content_detected`: one flag per image, or None when no safety checker ran."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None


def diffusers_call(call):
    """Decorate a pipeline's `__call__` with what diffusers' pipelines do around theirs: `cross_attention_kwargs=
    {"scale": s}` scales the LoRA adapters for the call; IP-Adapter inputs without a loaded IP-Adapter are
    refused before any work, with how to load one."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("ip_adapter_image") is not None or kwargs.get("ip_adapter_image_embeds") is not None:
            image_projection_layers(self)  # raises unless an IP-Adapter is loaded
        with self.lora_scale((kwargs.get("cross_attention_kwargs") or {}).get("scale")):
            return call(self, *args, **kwargs)

    return wrapper


def processor_kwargs(cross_attention_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """UNet kwargs for `cross_attention_kwargs` minus the LoRA "scale" (applied by `diffusers_call`)."""
    rest = {k: v for k, v in (cross_attention_kwargs or {}).items() if k != "scale"}
    return {"cross_attention_kwargs": rest} if rest else {}


HUB_KWARGS = ("cache_dir", "local_files_only", "token", "force_download", "proxies")


class DiffusionPipeline(LoraLoaderMixin, TextualInversionLoaderMixin, MemoryOptionsMixin, DenoisingCallMixin):
    """Holds the components (models, tokenizers, scheduler) named by `__init__`'s arguments; the per-call state
    and the glue to the denoising loop come from `DenoisingCallMixin` (call.py)."""

    numpy_to_pil = staticmethod(numpy_to_pil)  # diffusers' `DiffusionPipeline.numpy_to_pil`

    @property
    def image_processor(self) -> VaeImageProcessor:
        """diffusers' `pipe.image_processor`: images to the VAE's [-1, 1] and decoded pixels back to PIL / numpy."""
        vae = getattr(self, "vae", None)
        if vae is None:
            return VaeImageProcessor()
        return VaeImageProcessor(scale_factor(vae), vae.config.get("latent_channels", 4))

    _optional_components: tuple[str, ...] = ()
    _config_keys: tuple[str, ...] = ()  # non-component `__init__` arguments saved in model_index.json
    model_cpu_offload_seq = ""
    # `pipe.prompt_weighting = True`: AUTOMATIC1111's `(word:1.3)` syntax and prompts beyond 77 tokens
    # (read by the pipelines' `encode_prompt`: `text.encode_prompt_batch(weighted=...)`).
    prompt_weighting: bool = False
    # True where the UNet takes the VAE's latents alone (text-to-image): another kind (an inpainting UNet) is
    # refused when the pipeline is built, with the pipeline it belongs in.
    _latent_unet: bool = False

    def register_modules(self, **modules: Any) -> None:
        if self._latent_unet and hasattr(modules.get("unet"), "config") and hasattr(modules.get("vae"), "config"):
            from stablepipe.pipelines.image_stages import check_unet_channels

            latent, pipeline = modules["vae"].config.latent_channels, type(self).__name__
            xl = pipeline.startswith("StableDiffusionXL")
            examples = {latent: "stabilityai/stable-diffusion-xl-base-1.0"} if xl else None
            check_unet_channels(modules["unet"], [latent], pipeline, checkpoints=examples)
        for name, module in modules.items():
            object.__setattr__(self, name, module)
        self._component_names = list(dict.fromkeys([*getattr(self, "_component_names", []), *modules]))
        self._progress_bar_config: dict[str, Any] = getattr(self, "_progress_bar_config", {})

    # ---- components, device, dtype -----------------------------------------------------------------

    @classmethod
    def component_names(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters
        return [k for k in parameters if k != "self" and k not in cls._config_keys]

    @property
    def components(self) -> dict[str, Any]:
        """The modules of this pipeline by name: `OtherPipeline(**pipe.components)` shares them, no copy."""
        return {name: getattr(self, name) for name in self._component_names}

    @property
    def config(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._config_keys}

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        if self._offload_device is not None:  # CPU offload (memory.py): where the models compute
            return self._offload_device
        modules = self._modules()
        return modules[0].device if modules else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        modules = self._modules()
        return next(modules[0].parameters()).dtype if modules else torch.float32

    def to(self, *args: Any, **kwargs: Any) -> DiffusionPipeline:
        """Move every module: `.to("cuda")`, `.to(torch.bfloat16)`, `.to("cuda", torch.float16)`."""
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    # ---- progress ------------------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for tqdm, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total: int | None = None):
        return tqdm(iterable, total=total, **self._progress_bar_config)

    # ---- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> DiffusionPipeline:
        """Load a diffusers folder or Hub repo. Components given as keyword arguments replace the stored ones
        (`safety_checker=None` turns it off; `scheduler=...` swaps it). `torch_dtype` (or `dtype`) may be a
        torch dtype or its name ("float16"). `DiffusionPipeline.from_pretrained` builds the pipeline class that
        model_index.json names in `_class_name`, as diffusers does."""
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        torch_dtype = resolve_dtypes(torch_dtype, kwargs.pop("dtype", None))  # or {"unet": ..., "default": ...}
        index_path = fetch_file(path_or_repo_id, "model_index.json", revision=revision, **hub_kwargs)
        index = component_loading.read_model_index(index_path)
        if cls is DiffusionPipeline:
            named = pipeline_class(index.get("_class_name"), where=str(index_path))
            return named.from_pretrained(
                path_or_repo_id, torch_dtype=torch_dtype, variant=variant, revision=revision, **hub_kwargs, **kwargs
            )
        device = device_from_map(kwargs.pop("device_map", None))
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.component_names() or k in cls._config_keys}
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown arguments {sorted(kwargs)}")
        root = Path(path_or_repo_id)
        if not is_local(path_or_repo_id):
            root = component_loading.download_pipeline(
                str(path_or_repo_id), index, skip=set(given), variant=variant, revision=revision, **hub_kwargs
            )
        loaded = component_loading.load_components(
            root, index, cls.component_names(), cls._optional_components, given=given,
            torch_dtype=torch_dtype, variant=variant, pipeline_name=cls.__name__,
        )
        config = {k: index[k] for k in cls._config_keys if k in index}
        pipe = cls(**loaded, **{**config, **{k: v for k, v in given.items() if k in cls._config_keys}})
        return pipe if device is None else pipe.to(device)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: str | os.PathLike | None = None,
        prediction_type: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> DiffusionPipeline:
        """Load one `.safetensors` / `.ckpt` in the original (CompVis, Stability, AUTOMATIC1111) layout.

        The checkpoint type (SD 1.x, 2.x, inpainting, depth, XL base / refiner, x4 upscaler) is detected from
        its keys and shapes and configured from configs shipped with stablepipe; `config=` (a diffusers folder
        or Hub repo id) describes anything else. Components given as keyword arguments are used as they are.
        `DiffusionPipeline.from_single_file` picks the pipeline class of the detected type.
        """
        from stablepipe.loading.single_file import load_pipeline

        torch_dtype = resolve_dtype(torch_dtype, kwargs.pop("dtype", None))
        return load_pipeline(
            cls, path, config=config, prediction_type=prediction_type, torch_dtype=torch_dtype,
            resolve_class=pipeline_class if cls is DiffusionPipeline else None, **kwargs,
        )

    def save_single_file(
        self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, text_encoder_layout: str | None = None
    ) -> Path:
        """Write this pipeline's models as one original-layout `.safetensors` (or `.ckpt`) file."""
        from stablepipe.loading.single_file import save_single_file

        return save_single_file(self, path, dtype=dtype, text_encoder_layout=text_encoder_layout)

    def save_pretrained(
        self, folder: str | os.PathLike, *, variant: str | None = None, safe_serialization: bool = True
    ) -> Path:
        """Write the diffusers layout: model_index.json and one subfolder per component."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": "0.42.1"}
        for name, component in self.components.items():
            index[name] = component_loading.library_and_class(component)
            if component is not None:
                component_loading.save_component(
                    component, folder / name, variant=variant, safe_serialization=safe_serialization
                )
        index.update(self.config)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return folder

    @staticmethod
    def warn_once(message: str) -> None:
        warnings.warn(message, stacklevel=3)


def device_from_map(device_map: Any) -> torch.device | None:
    """diffusers' `device_map=` for a whole pipeline: one device ("cuda", "cpu", torch.device, {"": "cuda:1"}) the
    loaded pipeline moves to; None: where the weights were loaded (the CPU)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, torch.device | int) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        try:
            return torch.device(device_map)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device_map={device_map!r} is not a device: {error}") from error
    raise ValueError(
        f"device_map={device_map!r}: stablepipe puts a whole pipeline on one device; give that device "
        "(device_map='cuda', 'cpu' or {'': 'cuda:1'}), or call enable_model_cpu_offload() to save GPU memory"
    )


def pipeline_class(name: Any, *, where: str | None = None) -> type[DiffusionPipeline]:
    """The stablepipe pipeline class with diffusers' name `name` (`where`: the model_index.json it came from)."""
    module = PIPELINE_MODULES.get(name) if isinstance(name, str) else None
    if module is not None:
        return getattr(importlib.import_module(module), name)
    known = sorted(PIPELINE_MODULES)
    source = f"{where} names _class_name {name!r}" if where else f"{name!r} is not a stablepipe pipeline"
    if where and name is None:
        source = f"{where} has no _class_name"
    raise ValueError(
        f"{source}; stablepipe's pipelines are {', '.join(known)}. Load it with the pipeline class you want, "
        "e.g. StableDiffusionPipeline.from_pretrained(...)"
    )
