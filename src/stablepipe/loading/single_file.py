"""Single-file checkpoints: loading a pipeline from one `.safetensors` / `.ckpt` in the original CompVis /
Stability / AUTOMATIC1111 layout, and writing one from a diffusers folder.

A load is planned first (`Plan`: for each component, where its weights sit in the file and its config),
then built. The plan comes from the shipped config of the detected checkpoint type, or from `config=`, a
diffusers folder or Hub repo whose configs (and tokenizers, schedulers) describe the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from stablepipe.loading import components as component_loading
from stablepipe.loading.checkpoint import Checkpoint, read_checkpoint
from stablepipe.loading.files import HUB_KWARGS, check_state_dict, is_local
from stablepipe.loading.key_maps import CLIP_RULES, KeyMap, open_clip_rules, unet_rules, vae_rules
from stablepipe.loading.model_detection import detect_model_type, type_config

logger = logging.getLogger("stablepipe")

OUR_MODELS = ("UNet2DConditionModel", "AutoencoderKL")
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Where each model component sits in an original-layout file, in the order tried: (prefix, layout).
WEIGHT_SOURCES = {
    "unet": [("model.diffusion_model.", "unet")],
    "vae": [("first_stage_model.", "vae"), ("vae.", "vae")],
    "text_encoder": [("cond_stage_model.transformer.", "clip"), ("cond_stage_model.model.", "open_clip"),
                     ("conditioner.embedders.0.transformer.", "clip")],
    "text_encoder_2": [
        ("conditioner.embedders.1.model.", "open_clip"), ("conditioner.embedders.0.model.", "open_clip"),
    ],
}


@dataclasses.dataclass
class ComponentSpec:
    """How to make one component: from the file's weights (`prefix`, `layout`), or loaded from `source`
    (a local folder, or a Hub repo with `subfolder`), or built from `config` alone (schedulers; CLIP's tokenizer
    with library "shipped")."""

    class_name: str
    config: dict[str, Any] | None = None
    prefix: str | None = None
    layout: str | None = None
    source: str | None = None
    subfolder: str = ""
    library: str = "diffusers"


@dataclasses.dataclass
class Plan:
    model_type: str  # a shipped type name, or "config" when `config=` described the checkpoint
    pipeline: str  # the pipeline class that type loads into by default
    components: dict[str, ComponentSpec | None]
    pipeline_config: dict[str, Any]


# ---- planning ----------------------------------------------------------------------------------------------


def plan_from_type(data: Mapping[str, Any], prediction_type: str) -> Plan:
    """The plan a shipped type config (`configs/<type>.json`) describes."""
    overrides = data.get("when_epsilon", {}) if prediction_type == "epsilon" else {}
    specs: dict[str, ComponentSpec | None] = {}
    for name, entry in data["components"].items():
        if entry is None:
            specs[name] = None
            continue
        if "shipped" in entry:  # a tokenizer made from the vocabulary in the package (clip_tokenizer.py)
            specs[name] = ComponentSpec(entry["class"], dict(entry["shipped"]), library="shipped")
            continue
        config = {**entry["config"], **overrides.get(name, {})} if "config" in entry else None
        specs[name] = ComponentSpec(
            entry["class"], config, entry.get("prefix"), entry.get("layout") or _model_layout(entry["class"]),
            entry.get("repo"), entry.get("subfolder", ""), "transformers" if "repo" in entry else "diffusers",
        )
    return Plan(data["name"], data["pipeline"], specs, dict(data.get("pipeline_config", {})))


def _model_layout(class_name: str) -> str | None:
    return {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}.get(class_name)


def plan_from_folder(root: Path, state: Mapping[str, torch.Tensor], index: Mapping[str, Any]) -> Plan:
    """The plan for `config=`: models whose weights are in the file take them from it (with the folder's
    config.json); every other component is loaded from the folder."""
    specs: dict[str, ComponentSpec | None] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        if entry[1] is None:
            specs[name] = None
            continue
        found = _weights_in_file(name, state)
        if found is not None and entry[1] in (*OUR_MODELS, *TEXT_ENCODERS):
            specs[name] = ComponentSpec(entry[1], _read_json(root / name / "config.json"), *found)
        else:
            specs[name] = ComponentSpec(entry[1], source=str(root / name), library=entry[0])
    pipeline_config = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    return Plan("config", index.get("_class_name", ""), specs, pipeline_config)


def _weights_in_file(name: str, state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    for prefix, layout in WEIGHT_SOURCES.get(name, []):
        if any(key.startswith(prefix) for key in state):
            return prefix, layout
    return None


def _read_json(path: Path) -> dict[str, Any]:
    from stablepipe.loading.components import read_model_index
    from stablepipe.loading.files import read_json_object

    if not path.is_file():
        raise FileNotFoundError(f"the config folder has no {path.parent.name}/{path.name}")
    return read_model_index(path) if path.name == "model_index.json" else read_json_object(path)


# ---- building ----------------------------------------------------------------------------------------------


def key_map(layout: str, config: Mapping[str, Any], class_name: str) -> KeyMap:
    """The key conversion for one component of a single file."""
    if layout == "unet":
        return KeyMap(unet_rules(config))
    if layout == "vae":
        return KeyMap(vae_rules(config))
    if layout == "clip":
        return KeyMap(CLIP_RULES, ignore=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    layers = config["num_hidden_layers"]
    projection = class_name == "CLIPTextModelWithProjection"
    # SD 2.x files hold 24 OpenCLIP blocks; the model uses the penultimate layer, so the last is dropped.
    ignore = (f"transformer.resblocks.{layers}.", "logit_scale", "attn_mask")
    ignore += () if projection else ("text_projection",)
    return KeyMap(open_clip_rules(layers, projection=projection), ignore=ignore)


def component_weights(state: Mapping[str, torch.Tensor], spec: ComponentSpec, *, where: str) -> dict[str, torch.Tensor]:
    """The weights of one component, converted to diffusers' names."""
    part = {k[len(spec.prefix) :]: v for k, v in state.items() if k.startswith(spec.prefix)}
    if not part:
        raise ValueError(f"{where}: the file has no weights under {spec.prefix!r}; is it the right kind of checkpoint?")
    converted, unmatched = key_map(spec.layout, spec.config, spec.class_name).to_ours(part)
    if unmatched:
        logger.warning("%s: ignored %d weights no rule knows, e.g. %s", where, len(unmatched), unmatched[:3])
    return converted


def build_model(spec: ComponentSpec, checkpoint: Checkpoint, *, name: str, torch_dtype: torch.dtype) -> torch.nn.Module:
    """A UNet, VAE or text encoder from the file's weights, checked strictly against its config."""
    where = f"{checkpoint.path.name} ({name})"
    state = component_weights(checkpoint.state, spec, where=where)
    if spec.class_name in OUR_MODELS:
        cls = component_loading.resolve_class("diffusers", spec.class_name, component=name)
        return cls.from_state_dict(spec.config, state, where=where, torch_dtype=torch_dtype)
    return build_text_encoder(spec.class_name, spec.config, state, where=where, torch_dtype=torch_dtype)


def build_text_encoder(
    class_name: str, config: Mapping[str, Any], state: dict[str, torch.Tensor], *, where: str, torch_dtype: torch.dtype
) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, class_name)
    text_config = cls.config_class.from_dict(dict(config))
    with torch.device("meta"):
        probe = cls(text_config)
    state = match_clip_names(state, probe.state_dict().keys())
    check_state_dict(probe, state, where=where)
    model = cls.from_pretrained(None, config=text_config, state_dict=state, dtype=torch_dtype)
    return model.eval()


def match_clip_names(state: Mapping[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """Our maps name CLIP weights `text_model.*`; transformers >= 5.6 flattens CLIPTextModel's names."""
    expected = set(expected)
    if any(k.startswith("text_model.") for k in expected):
        return dict(state)
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def canonical_clip_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `match_clip_names`: every CLIP weight under `text_model.` (projection aside)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state.items()}


def build_loaded(spec: ComponentSpec, *, name: str, torch_dtype: torch.dtype, hub_kwargs: dict[str, Any]) -> Any:
    """A component the file does not hold: a scheduler from its config, or a tokenizer, image processor or
    other model from a folder or Hub repo; CLIP's tokenizer from the package."""
    if spec.library == "shipped":
        from stablepipe.loading.clip_tokenizer import clip_tokenizer

        return clip_tokenizer(**spec.config)
    cls = component_loading.resolve_class(spec.library, spec.class_name, component=name)
    if spec.source is None:
        return cls.from_config(spec.config)
    folder = Path(spec.source, spec.subfolder) if is_local(spec.source) else hub_folder(spec, name, hub_kwargs)
    if not folder.is_dir() or not any(folder.iterdir()):  # transformers would build an empty tokenizer
        raise FileNotFoundError(f"the {name} folder {folder} is missing or empty; pass `{name}=...` yourself")
    return component_loading.load_component(cls, folder, torch_dtype=torch_dtype, variant=None)


def hub_folder(spec: ComponentSpec, name: str, hub_kwargs: dict[str, Any]) -> Path:
    """The local copy of a component's folder in a Hub repo (from the cache when offline)."""
    from stablepipe.loading.files import snapshot

    prefix = f"{spec.subfolder}/" if spec.subfolder else ""
    try:
        root = snapshot(spec.source, allow_patterns=[f"{prefix}*"], **hub_kwargs)
    except OSError as err:
        raise OSError(
            f"the {name} for this checkpoint comes from Hub repo {spec.source!r} (folder {spec.subfolder!r}), "
            f"which could not be found or downloaded: {err}. Pass `{name}=...` yourself, or `config=` a local "
            "diffusers folder of the same model."
        ) from err
    return root / spec.subfolder


# ---- the pipeline ----------------------------------------------------------------------------------------


def resolve_file(path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    """A local file, or a Hub file as `https://huggingface.co/<repo>/blob/<revision>/<file>`."""
    text = str(path)
    if Path(text).is_file():
        return Path(text)
    for host in ("https://huggingface.co/", "huggingface.co/", "https://hf.co/", "hf.co/"):
        if text.startswith(host):
            parts = text[len(host) :].split("/")
            if len(parts) >= 5 and parts[2] in ("blob", "resolve"):
                from stablepipe.loading.files import fetch_file

                repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                return fetch_file(repo, filename, revision=revision, **hub_kwargs)
    raise FileNotFoundError(
        f"no checkpoint file at {text}; give a local .safetensors/.ckpt path or a Hub file URL "
        "(https://huggingface.co/<repo>/blob/main/<file>)"
    )


def make_plan(
    checkpoint: Checkpoint, *, config: str | os.PathLike | None, prediction_type: str | None, hub_kwargs: dict[str, Any]
) -> Plan:
    if config is None:
        detected = detect_model_type(
            checkpoint.state, global_step=checkpoint.global_step, metadata=checkpoint.metadata,
            where=str(checkpoint.path),
        )
        return plan_from_type(type_config(detected.model_type), prediction_type or detected.prediction_type)
    root = config_folder(config, hub_kwargs)
    return plan_from_folder(root, checkpoint.state, _read_json(root / "model_index.json"))


def config_folder(config: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    """`config=`: a local diffusers folder, or a Hub repo of which only configs and tokenizers are fetched."""
    if is_local(config):
        if not Path(config, "model_index.json").is_file():
            raise FileNotFoundError(f"config={str(config)!r} has no model_index.json; give a diffusers folder")
        return Path(config)
    from stablepipe.loading.files import snapshot

    patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model"]
    return snapshot(str(config), allow_patterns=patterns, revision=hub_kwargs.pop("revision", None), **hub_kwargs)


def build_components(
    pipeline_cls, plan: Plan, checkpoint: Checkpoint, *, given: dict[str, Any], torch_dtype: torch.dtype,
    prediction_type: str | None, hub_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Every component `pipeline_cls.__init__` names: given ones as is, the rest as the plan says."""
    built: dict[str, Any] = {}
    for name in pipeline_cls.component_names():
        spec = plan.components.get(name)
        if name in given:
            built[name] = given[name]
        elif spec is None or _weights_missing(spec):
            if name not in pipeline_cls._optional_components:
                raise ValueError(
                    f"{pipeline_cls.__name__} needs a {name!r}, which a {plan.model_type} single file does not "
                    f"provide; pass `{name}=...` to from_single_file, or `config=` a diffusers folder that has one"
                )
            built[name] = None
        elif spec.prefix is not None:
            built[name] = build_model(spec, checkpoint, name=name, torch_dtype=torch_dtype)
        else:
            if name == "scheduler" and prediction_type and spec.source is None:
                spec = dataclasses.replace(spec, config={**spec.config, "prediction_type": prediction_type})
            built[name] = build_loaded(spec, name=name, torch_dtype=torch_dtype, hub_kwargs=hub_kwargs)
            if name == "scheduler" and prediction_type and built[name].config.get("prediction_type") != prediction_type:
                built[name] = type(built[name]).from_config(built[name].config, prediction_type=prediction_type)
    return built


def _weights_missing(spec: ComponentSpec) -> bool:
    """A module in a config folder fetched from the Hub without its weights (the safety checker)."""
    if spec.source is None or spec.library == "transformers" and spec.class_name.endswith(("Tokenizer", "Processor")):
        return False
    folder = Path(spec.source, spec.subfolder)
    is_model = spec.class_name.endswith(("Model", "Checker", "Estimation", "Encoder", "WithProjection"))
    return folder.is_dir() and is_model and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))


def load_pipeline(
    pipeline_cls, path: str | os.PathLike, *, config: str | os.PathLike | None = None,
    prediction_type: str | None = None, torch_dtype: torch.dtype | None = None,
    resolve_class: Callable[[str], type] | None = None, **kwargs: Any,
):
    """`Pipeline.from_single_file`: see `DiffusionPipeline.from_single_file` for the arguments. With
    `resolve_class` (diffusers' pipeline name -> our class), the class is the one of the detected checkpoint
    type, as `DiffusionPipeline.from_single_file` picks it; without, `pipeline_cls` is built."""
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    if kwargs.pop("original_config", None) is not None or kwargs.pop("original_config_file", None) is not None:
        raise ValueError("original YAML configs are not read; pass `config=` a diffusers folder or Hub repo id instead")
    hub_kwargs = {k: kwargs.pop(k) for k in (*HUB_KWARGS, "revision") if k in kwargs}
    checkpoint = read_checkpoint(resolve_file(path, hub_kwargs), torch_dtype)
    plan = make_plan(checkpoint, config=config, prediction_type=prediction_type, hub_kwargs=dict(hub_kwargs))
    hub_kwargs.pop("revision", None)
    if resolve_class is not None:
        pipeline_cls = resolve_class(plan.pipeline)
    known = set(pipeline_cls.component_names()) | set(pipeline_cls._config_keys)
    if unknown := sorted(set(kwargs) - known):
        raise TypeError(f"{pipeline_cls.__name__}.from_single_file got unknown arguments {unknown}")
    given = {k: v for k, v in kwargs.items() if k in pipeline_cls.component_names()}
    built = build_components(
        pipeline_cls, plan, checkpoint, given=given, torch_dtype=torch_dtype or torch.float32,
        prediction_type=prediction_type, hub_kwargs=hub_kwargs,
    )
    settings = {k: v for k, v in plan.pipeline_config.items() if k in pipeline_cls._config_keys}
    settings.update({k: v for k, v in kwargs.items() if k in pipeline_cls._config_keys})
    return pipeline_cls(**built, **settings)


# ---- writing a single file -------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelWeights:
    """One model of a pipeline as the exporter needs it."""

    class_name: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]


def export_targets(
    models: Mapping[str, ModelWeights], *, text_encoder_layout: str | None
) -> dict[str, tuple[str, str]]:
    """Where each model goes in the original layout: {name: (prefix, layout)}. SDXL puts its encoders in
    `conditioner.embedders`; SD 2.x's OpenCLIP encoder (GELU) is written in OpenCLIP's names, SD 1.x's in CLIP's."""
    targets = {"unet": ("model.diffusion_model.", "unet"), "vae": ("first_stage_model.", "vae")}
    first = models.get("text_encoder")
    if "text_encoder_2" in models:
        if first is not None:
            targets["text_encoder"] = ("conditioner.embedders.0.transformer.", "clip")
        slot = 1 if first is not None else 0
        targets["text_encoder_2"] = (f"conditioner.embedders.{slot}.model.", "open_clip")
    elif first is not None:
        layout = text_encoder_layout or ("open_clip" if first.config.get("hidden_act") == "gelu" else "clip")
        if layout not in ("clip", "open_clip"):
            raise ValueError(f"text_encoder_layout must be 'clip' or 'open_clip', got {layout!r}")
        prefix = "cond_stage_model.model." if layout == "open_clip" else "cond_stage_model.transformer."
        targets["text_encoder"] = (prefix, layout)
    return {name: target for name, target in targets.items() if models.get(name) is not None}


def original_state_dict(
    models: Mapping[str, ModelWeights], *, text_encoder_layout: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every model's weights in one flat dict with the original checkpoint's names."""
    out: dict[str, torch.Tensor] = {}
    for name, (prefix, layout) in export_targets(models, text_encoder_layout=text_encoder_layout).items():
        model = models[name]
        state = model.state if layout in ("unet", "vae") else canonical_clip_names(model.state)
        converted, unmatched = key_map(layout, model.config, model.class_name).to_theirs(state)
        if unmatched:
            raise ValueError(f"{name}: no rule for {len(unmatched)} weights, e.g. {unmatched[:3]}; cannot export")
        for key, tensor in converted.items():
            out[prefix + key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def folder_models(folder: str | os.PathLike) -> tuple[dict[str, ModelWeights], dict[str, Any]]:
    """The models of a diffusers folder (read as weights and configs, not built) and its scheduler config."""
    from stablepipe.loading.files import WEIGHT_NAMES, find_weight_files, load_state_dict

    root = Path(folder)
    index = _read_json(root / "model_index.json")
    models: dict[str, ModelWeights] = {}
    for name in WEIGHT_SOURCES:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[1] is None:
            continue
        base = WEIGHT_NAMES["transformers" if entry[0] == "transformers" else "diffusers"]
        files = find_weight_files(root / name, base)
        models[name] = ModelWeights(entry[1], _read_json(root / name / "config.json"), load_state_dict(files))
    scheduler = root / "scheduler" / "scheduler_config.json"
    return models, _read_json(scheduler) if scheduler.is_file() else {}


def pipeline_models(pipe) -> tuple[dict[str, ModelWeights], dict[str, Any]]:
    """The same for a loaded pipeline."""
    models = {}
    for name in WEIGHT_SOURCES:
        module = getattr(pipe, name, None)
        if module is not None:
            config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
            models[name] = ModelWeights(type(module).__name__, config, module.state_dict())
    scheduler = getattr(pipe, "scheduler", None)
    return models, dict(scheduler.config) if scheduler is not None else {}


def save_single_file(
    source, path: str | os.PathLike, *, text_encoder_layout: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a pipeline (or a diffusers folder) as one original-layout `.safetensors` or `.ckpt` file."""
    from stablepipe.loading.checkpoint import write_checkpoint

    models, scheduler = folder_models(source) if isinstance(source, str | os.PathLike) else pipeline_models(source)
    state = original_state_dict(models, text_encoder_layout=text_encoder_layout, dtype=dtype)
    prediction = scheduler.get("prediction_type", "epsilon")
    metadata = {"modelspec.prediction_type": "v" if prediction == "v_prediction" else prediction}
    return write_checkpoint(state, path, metadata=metadata)
