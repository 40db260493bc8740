"""Pipeline components: which class loads each entry of `model_index.json`, loading, saving, Hub downloads."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from stablepipe.loading.checkpoint import CheckpointError, safetensors_header
from stablepipe.loading.dtypes import dtype_for
from stablepipe.loading.files import VariantNotFoundError, fetch_file, has_variant, read_json_object, snapshot

# Libraries named in model_index.json whose classes stablepipe implements itself.
OUR_LIBRARIES = {"diffusers", "stable_diffusion", "stable_diffusion_safe", "stablepipe"}

# Our classes by diffusers' name; schedulers are looked up in stablepipe.schedulers.
OUR_CLASSES = {
    "UNet2DConditionModel": "stablepipe.models.unet",
    "AutoencoderKL": "stablepipe.models.vae",
    "StableDiffusionSafetyChecker": "stablepipe.models.safety",
}

# Other names for our classes in published model_index.json files (same weights).
CLASS_ALIASES = {"SafeStableDiffusionSafetyChecker": "StableDiffusionSafetyChecker"}

# Old transformers names still found in published model_index.json files.
TRANSFORMERS_ALIASES = {"CLIPFeatureExtractor": "CLIPImageProcessor", "DPTFeatureExtractor": "DPTImageProcessor"}


def resolve_class(library: str, class_name: str, *, component: str) -> type:
    """The class that loads one component, or a clear error saying what is supported."""
    if library in OUR_LIBRARIES:
        class_name = CLASS_ALIASES.get(class_name, class_name)
        if class_name in OUR_CLASSES:
            return getattr(importlib.import_module(OUR_CLASSES[class_name]), class_name)
        from stablepipe.schedulers import SCHEDULER_CLASSES

        if class_name in SCHEDULER_CLASSES:
            return SCHEDULER_CLASSES[class_name]
        if class_name.endswith("Scheduler"):
            raise ValueError(
                f"unknown scheduler {class_name!r} for component {component!r}; stablepipe knows "
                f"{', '.join(sorted(SCHEDULER_CLASSES))}. Pass `scheduler=` to from_pretrained to choose one."
            )
        raise ValueError(
            f"component {component!r} is a {library}.{class_name}, which stablepipe does not implement; "
            f"it implements {', '.join(sorted(OUR_CLASSES))} and the schedulers"
        )
    if library == "transformers":
        import transformers

        name = TRANSFORMERS_ALIASES.get(class_name, class_name)
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(f"component {component!r}: cannot load {library}.{class_name}")


def load_component(cls: type, folder: Path, *, torch_dtype: torch.dtype | None, variant: str | None) -> Any:
    """Load one component folder with the class's own `from_pretrained`, checking weights strictly."""
    import transformers

    if issubclass(cls, transformers.PreTrainedModel):
        return load_transformers_model(cls, folder, torch_dtype=torch_dtype, variant=variant)
    if issubclass(cls, torch.nn.Module):
        return cls.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    return cls.from_pretrained(folder)


def load_transformers_model(
    cls: type, folder: Path, *, torch_dtype: torch.dtype | None, variant: str | None
) -> torch.nn.Module:
    """A transformers model, failing loudly on missing, unexpected or mismatched weights (and, before transformers
    reads them, on safetensors files whose header does not fit the file)."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            safetensors_header(path)
        except CheckpointError as err:
            raise OSError(str(err)) from err
    kwargs: dict[str, Any] = {"output_loading_info": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if variant is not None:  # load_components passes a variant only where the folder has its files
        kwargs["variant"] = variant
    model, info = cls.from_pretrained(folder, **kwargs)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        details = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise ValueError(f"the weights in {folder} do not match {cls.__name__}'s config.json: {details}")
    return model.eval()


def read_model_index(path: Path) -> dict[str, Any]:
    """A pipeline's model_index.json: a JSON object whose component entries are [library, class name] (or nulls)."""
    index = read_json_object(path)
    for name, entry in index.items():
        if isinstance(entry, list) and not is_component_entry(entry):
            raise ValueError(
                f"{path}: component {name!r} is {json.dumps(entry)[:80]}, but a component entry is "
                '[library, class name], e.g. ["diffusers", "UNet2DConditionModel"], or [null, null] for none'
            )
    if not isinstance(index.get("_class_name", ""), str):
        raise ValueError(f"{path}: _class_name must be a string naming the pipeline class, e.g. "
                         '"StableDiffusionPipeline"')
    return index


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".sft")


def pipeline_class_name(source: str, *, revision: str | None = None) -> str | None:
    """`_class_name` from the model_index.json of a folder or Hub repo; None for a single-file checkpoint."""
    if Path(source).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return None
    index = json.loads(Path(fetch_file(source, "model_index.json", revision=revision)).read_text())
    return index.get("_class_name", "StableDiffusionPipeline")


def shared_components(cls, pipe) -> dict[str, Any]:
    """The arguments that build pipeline class `cls` from the loaded pipeline `pipe`: its components and config
    that `cls` takes (the components it lacks are left to `cls`'s defaults), shared, not copied."""
    names = set(cls.component_names()) | set(cls._config_keys)
    given = {**pipe.components, **pipe.config}
    return {k: v for k, v in given.items() if k in names}


def is_component_entry(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and all(e is None or isinstance(e, str) for e in entry)


def load_components(
    root: Path,
    index: dict[str, Any],
    names: list[str],
    optional: Iterable[str],
    *,
    given: dict[str, Any],
    torch_dtype: torch.dtype | dict[str, torch.dtype] | None,
    variant: str | None,
    pipeline_name: str,
) -> dict[str, Any]:
    """Every component a pipeline's `__init__` names: given ones as is, the rest from `root/<name>/`."""
    loaded: dict[str, Any] = {}
    if variant is not None:  # as diffusers: components without the variant load their plain weights, but not all
        stored = [n for n in names if n not in given and is_component_entry(index.get(n)) and index[n][1] is not None]
        if stored and not any(has_variant(root / name, variant) for name in stored):
            raise VariantNotFoundError(
                f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
                f"available in {root}: none of {stored} has a *.{variant}.* file; load without variant= to use "
                "the plain weights"
            )
    for name in names:
        if name in given:
            loaded[name] = given[name]
            continue
        entry = index.get(name)
        if entry is not None and not is_component_entry(entry):
            raise ValueError(
                f"{root}/model_index.json: {pipeline_name} needs component {name!r} as [library, class name], "
                f"e.g. [\"diffusers\", \"UNet2DConditionModel\"], but it is {json.dumps(entry)[:80]}"
            )
        if entry is None or entry[1] is None:
            if name not in optional:
                raise ValueError(
                    f"{pipeline_name} needs a {name!r} component, but {root}/model_index.json has none; "
                    f"pass `{name}=` to from_pretrained or load a checkpoint that has one"
                )
            loaded[name] = None
            continue
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"model_index.json lists component {name!r} but the folder {folder} is missing; "
                "the download may be incomplete"
            )
        cls = resolve_class(entry[0], entry[1], component=name)
        found = variant if variant is not None and has_variant(folder, variant) else None
        loaded[name] = load_component(cls, folder, torch_dtype=dtype_for(torch_dtype, name), variant=found)
    return loaded


def library_and_class(component: Any) -> list[str | None]:
    """The `[library, class]` entry for model_index.json, in diffusers' naming so diffusers can load it."""
    if component is None:
        return [None, None]
    name = type(component).__name__
    if type(component).__module__.startswith("transformers"):
        return ["transformers", name]
    if name == "StableDiffusionSafetyChecker":
        return ["stable_diffusion", name]
    return ["diffusers", name]


def save_component(component: Any, folder: Path, *, variant: str | None, safe_serialization: bool) -> None:
    import transformers

    if isinstance(component, transformers.PreTrainedModel):
        component.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
    elif isinstance(component, torch.nn.Module):
        component.save_pretrained(folder, variant=variant, safe_serialization=safe_serialization)
    else:
        component.save_pretrained(folder)


def hub_patterns(index: dict[str, Any], files: list[str] | None, *, skip: set[str], variant: str | None) -> list[str]:
    """Which files of a Hub repo to fetch: configs and tokenizers, and per component one weight format
    (safetensors over bin, the variant when present). `files` is the repo listing, or None offline."""
    patterns = ["model_index.json"]
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[1] is None or name in skip:
            continue
        patterns += [f"{name}/*.json", f"{name}/*.txt", f"{name}/*.model"]
        weights = [f for f in (files or []) if f.startswith(f"{name}/") and f.endswith((".safetensors", ".bin"))]
        for ext in ("safetensors", "bin"):
            parts = {f: f.rsplit("/", 1)[-1].split(".") for f in weights if f.endswith(ext)}
            with_variant = [f for f, p in parts.items() if variant and len(p) == 3 and p[1].startswith(variant)]
            plain = [f for f, p in parts.items() if len(p) == 2]
            if with_variant or plain:
                patterns += with_variant or plain
                break
        if files is None:  # offline: take whatever the cache holds
            patterns += [f"{name}/*.safetensors", f"{name}/*.bin"]
    return patterns


def download_pipeline(
    repo_id: str,
    index: dict[str, Any],
    *,
    skip: set[str],
    variant: str | None,
    revision: str | None,
    **hub_kwargs: Any,
) -> Path:
    """Fetch only the files a pipeline needs from the Hub (or find them in the cache when offline)."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    files = None
    if not (HF_HUB_OFFLINE or hub_kwargs.get("local_files_only")):
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision, token=hub_kwargs.get("token"))
        except Exception:  # no network: fall back to the cache
            files = None
    patterns = hub_patterns(index, files, skip=skip, variant=variant)
    hub_kwargs["local_files_only"] = files is None
    return snapshot(repo_id, allow_patterns=patterns, revision=revision, **hub_kwargs)
