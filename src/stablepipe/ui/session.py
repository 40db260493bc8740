"""The web app's models: each checkpoint is loaded once, and every tab builds its pipeline from the loaded
components (`Pipeline(**pipe.components)`: shared weights, no copy).

A checkpoint goes into a *slot* named after what it is (its `model_index.json` `_class_name`, or the type
detected in a single file): the SD 1.x / 2.x text model serves text-to-image, image-to-image, inpainting and
safe mode; depth, variation, the upscalers, SDXL (base and refiner) and LDM3D each need their own checkpoint.
Nothing here imports gradio, so it is testable on its own.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from typing import Any

import torch

from stablepipe.builtin import BUILTIN_MODELS
from stablepipe.loading.components import pipeline_class_name, shared_components


@dataclasses.dataclass(frozen=True)
class Slot:
    """A kind of checkpoint the app can hold: what it is for, its usual Hub id, and its pipeline classes."""

    key: str
    article: str  # "a", "an" or "the"
    name: str  # what it is, for people: "depth-to-image model"
    example: str  # the checkpoint most people would load
    classes: tuple[str, ...]  # model_index.json `_class_name`s that go into this slot

    @property
    def title(self) -> str:
        return f"{self.article} {self.name}"


SLOTS = {
    slot.key: slot
    for slot in (
        Slot("sd", "a", "Stable Diffusion 1.x / 2.x model", "stable-diffusion-v1-5/stable-diffusion-v1-5",
             ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionPipelineSafe")),
        Slot("inpaint", "an", "inpainting model", "stable-diffusion-v1-5/stable-diffusion-inpainting",
             ("StableDiffusionInpaintPipeline",)),
        Slot("depth", "a", "depth-to-image model", "stabilityai/stable-diffusion-2-depth",
             ("StableDiffusionDepth2ImgPipeline",)),
        Slot("variation", "an", "image-variation model", "lambdalabs/sd-image-variations-diffusers",
             ("StableDiffusionImageVariationPipeline",)),
        Slot("x4", "the", "x4 upscaler", "stabilityai/stable-diffusion-x4-upscaler",
             ("StableDiffusionUpscalePipeline",)),
        Slot("x2", "the", "x2 latent upscaler", "stabilityai/sd-x2-latent-upscaler",
             ("StableDiffusionLatentUpscalePipeline",)),
        Slot("sdxl", "an", "SDXL base model", "stabilityai/stable-diffusion-xl-base-1.0",
             ("StableDiffusionXLPipeline",)),
        Slot("refiner", "the", "SDXL refiner", "stabilityai/stable-diffusion-xl-refiner-1.0",
             ("StableDiffusionXLImg2ImgPipeline",)),
        Slot("ldm3d", "an", "LDM3D model", "Intel/ldm3d-4c", ("StableDiffusionLDM3DPipeline",)),
    )
}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # owner/name, as the Hub allows
_PATH = re.compile(r"(?<![\w.-])(?:[A-Za-z]:)?[/\\][^\s'\",;)]*")  # an absolute path inside a message


def without_paths(message: str) -> str:
    """`message` with every absolute path in it replaced by '<path>'."""
    return _PATH.sub("<path>", message)


BUILTIN = "builtin"  # what to type (or pass to `load`) for a slot's built-in model
BUILTINS = tuple(kind for kind in BUILTIN_MODELS if kind in SLOTS)  # the slots that have one


def builtin_path(slot: str) -> Path:
    """The folder of `slot`'s built-in model (the trained demo model for "sd" where the package ships it, else tiny
    random weights: the picture is noise), built on first use in the stablepipe cache by the same code as the
    command line's (`stablepipe.builtin`); a ValueError if the slot has none."""
    if slot not in BUILTINS:
        info = SLOTS[slot]
        raise ValueError(f"there is no built-in tiny {info.name}: load a real one, e.g. {info.example}")
    return Path(BUILTIN_MODELS[slot]())


def slot_for_class(class_name: str) -> str:
    """The slot a pipeline class name goes into, or a ValueError naming the ones the app knows."""
    for slot in SLOTS.values():
        if class_name in slot.classes:
            return slot.key
    known = ", ".join(name for slot in SLOTS.values() for name in slot.classes)
    raise ValueError(f"the web app has no tab for a {class_name} checkpoint; it loads {known}")


def check_slot(source: str, class_name: str, slot: str | None) -> str:
    """The slot of a `class_name` checkpoint; a ValueError if `slot` is given and is another."""
    found = slot_for_class(class_name)
    if slot is not None and found != slot:
        raise ValueError(f"{source} is a {class_name}; this tab needs {SLOTS[slot].title}, e.g. {SLOTS[slot].example}")
    return found


class ModelManager:
    """Holds one loaded pipeline per slot and builds each tab's pipeline from its components on request."""

    def __init__(
        self, *, device: torch.device, dtype: torch.dtype, safety_checker: bool = True, variant: str | None = None,
        revision: str | None = None, allow_paths: bool = True,
    ):
        """`allow_paths=False` (an app listening beyond this machine): the Load boxes take Hub ids and "builtin"
        only, and their errors never name a path, so a visitor cannot probe the server's disk."""
        self.device, self.dtype, self.safety_checker = device, dtype, safety_checker
        self.allow_paths = allow_paths
        self.variant, self.revision = variant, revision
        self.sources: dict[str, str] = {}  # slot -> what was loaded there (its name in the page and the PNGs)
        self._loaded: dict[str, Any] = {}
        self._paths: dict[str, str] = {}  # slot -> the folder, file or Hub id read
        self._hashes: dict[str, str | None] = {}  # slot -> its A1111 short model hash, once asked for
        self._lock = threading.Lock()

    def loaded(self, slot: str):
        """The pipeline in `slot`, or None."""
        return self._loaded.get(slot)

    def load(self, source: str, *, slot: str | None = None, label: str | None = None) -> str:
        """Load the checkpoint at `source` (Hub id, diffusers folder or single file) into its slot, which is
        detected unless given; returns the slot. Replaces what was there. `label`: its name in the page and the
        PNGs' settings (default: `source`). "builtin" loads the slot's built-in model (see `builtin_path`)."""
        source = str(source).strip()
        if not self.allow_paths and source != BUILTIN:
            return self._load_hub_only(source, slot, label)
        if source == BUILTIN:
            slot, label = slot or "sd", BUILTIN
            source = str(builtin_path(slot))
        if not source:
            raise ValueError("no model given: type a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), "
                             "a diffusers folder or a .safetensors file")
        with self._lock:
            pipe = self._read(source, slot)
            found = check_slot(source, type(pipe).__name__, slot)  # a single file's type is known once read
            self._loaded[found], self.sources[found] = pipe.to(self.device), label or source
            self._paths[found] = source
            self._hashes.pop(found, None)
        return found

    def _load_hub_only(self, source: str, slot: str | None, label: str | None) -> str:
        """`load` of a Hub repo id from a public app: no local path is looked at, and no error names one."""
        if not HUB_ID.fullmatch(source):
            raise ValueError(f"{source!r} is not a Hub repo id (owner/name); loading from the server's files is "
                             "off for an app that listens beyond 127.0.0.1 (start it with --allow-model-paths to "
                             "allow it)")
        missing = f"could not load {source!r}: it is not a Hub repo this server has or can download"
        if Path(source).exists():  # a relative path that happens to look like owner/name: said as for a missing repo
            raise ValueError(missing)
        with self._lock:
            try:
                pipe = self._read(source, slot)
                found = check_slot(source, type(pipe).__name__, slot)
            except OSError:
                raise ValueError(missing) from None
            except ValueError as err:  # e.g. a repo of a kind the app has no tab for
                raise ValueError(without_paths(str(err))) from None
            self._loaded[found], self.sources[found] = pipe.to(self.device), label or source
            self._paths[found] = source
            self._hashes.pop(found, None)
        return found

    def model_hash(self, slot: str) -> str | None:
        """The A1111 short hash of the model in `slot` (see `infotext.model_hash`), computed once per load."""
        from stablepipe.infotext import local_model_hash

        if slot not in self._hashes and slot in self._paths:
            self._hashes[slot] = local_model_hash(self._paths[slot])
        return self._hashes.get(slot)

    def _read(self, source: str, slot: str | None):
        from stablepipe.pipelines.base import DiffusionPipeline, pipeline_class

        class_name = pipeline_class_name(source, revision=self.revision)
        cls = DiffusionPipeline if class_name is None else pipeline_class(class_name)
        if class_name is not None:
            check_slot(source, class_name, slot)  # before reading any weights
        kwargs = self._shared_with_base(class_name)
        if not self.safety_checker and "safety_checker" in (cls.component_names() if class_name else ()):
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if class_name is None:
            return cls.from_single_file(source, torch_dtype=self.dtype, **kwargs)
        return cls.from_pretrained(source, torch_dtype=self.dtype, variant=self.variant, revision=self.revision,
                                   **kwargs)

    def _shared_with_base(self, class_name: str | None) -> dict[str, Any]:
        """The SDXL refiner reuses the base's second text encoder and VAE, as diffusers' docs show."""
        base = self._loaded.get("sdxl")
        if class_name == "StableDiffusionXLImg2ImgPipeline" and base is not None:
            return {"text_encoder_2": base.text_encoder_2, "vae": base.vae}
        return {}

    def pipeline(self, cls, slot: str, *, scheduler: str | None = None, prompt_weighting: bool = False):
        """A `cls` built from the components in `slot` (no weights copied), with the sampler named
        `scheduler` (A1111 / ComfyUI names) or the model's own, reading AUTOMATIC1111's prompt syntax when
        `prompt_weighting`; a ValueError saying what to load if empty."""
        pipe = self._loaded.get(slot)
        if pipe is None:
            raise ValueError(self.missing_message(slot))
        kwargs = shared_components(cls, pipe)
        if scheduler:
            from stablepipe.schedulers.names import scheduler_from_name

            kwargs["scheduler"] = scheduler_from_name(scheduler, pipe.scheduler.config)
        built = cls(**kwargs)
        built.prompt_weighting = prompt_weighting
        built.set_progress_bar_config(desc="Denoising")
        return built

    def default_size(self, slot: str) -> tuple[int, int]:
        """(width, height) the model in `slot` was trained at (its UNet's sample size times the VAE's scale),
        for the size sliders; the family's usual size when none is loaded."""
        pipe = self._loaded.get(slot)
        if pipe is None or getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
            side = 1024 if slot in ("sdxl", "refiner") else 512
            return side, side
        sample = pipe.unet.config.sample_size
        height, width = (sample, sample) if isinstance(sample, int) else sample
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return width * scale, height * scale

    def missing_message(self, slot: str) -> str:
        info = SLOTS[slot]
        return f"This needs {info.title}, and none is loaded: load one first (e.g. {info.example})."

    def status(self, slot: str) -> str:
        """One line for the page: what is loaded in `slot`, or what to load."""
        if slot in self.sources:
            return f"Loaded {SLOTS[slot].name}: `{self.sources[slot]}`"
        info = SLOTS[slot]
        builtin = f", or `{BUILTIN}` for a tiny random one" if slot in BUILTINS else ""
        return f"Not loaded. This tab needs {info.title}: type its Hub id or folder (e.g. `{info.example}`{builtin})" \
            " and press Load."
