"""LoRA adapters for the UNet and text encoders, without PEFT (Hu et al. 2021, "LoRA", Eq. 3: h = W x + B A x).

A LoRA file holds, per adapted layer, a down projection A (rank r) and an up projection B, and optionally
alpha: the layer's output gains `weight * alpha / r * B(A(x))`. Layouts read:
- diffusers / PEFT: `unet.<module>.lora_A.weight`, `lora_B`, alpha in the `lora_adapter_metadata` header;
  older diffusers spellings `.lora.down/up`, `.lora_linear_layer.down/up`, `.processor.to_q_lora.down/up`;
- kohya / AUTOMATIC1111: `lora_unet_<module_with_underscores>.lora_down/lora_up.weight` and `.alpha`, with
  `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders; SDXL UNets in the original (ldm) names.

Adapters run as forward hooks on the targeted `nn.Linear` / `nn.Conv2d` layers: the modules and their state
dicts stay as they are. `fuse` adds the weighted deltas into the weights; `unfuse` takes them out again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# Key endings -> the part of a LoRA pair they hold.
ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up",
         ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
         ".lora_linear_layer.up.weight": "up", ".alpha": "alpha"}
OLD_PROCESSOR = [(re.compile(r"\.processor\.(to_[qkv])_lora\."), r".\1.lora."),
                 (re.compile(r"\.processor\.to_out_lora\."), ".to_out.0.lora.")]
UNSUPPORTED = ("hada_w1", "lokr_w1", "dora_scale", "lora_magnitude_vector", ".diff", "oft_")
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def finite_lora_weight(value: Any, name: str) -> float:
    """A LoRA weight or scale as a float; NaN / inf (which would turn every weight it touches into NaN) refused."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}: it would turn the weights into NaN")
    return number


@dataclasses.dataclass
class LoraPair:
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None

    @property
    def scale(self) -> float:
        rank = self.down.shape[0]
        return (self.alpha if self.alpha is not None else rank) / rank

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """B A as a weight of `weight`'s shape: (out, in) or (out, in, kh, kw)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()  # (out, in * kh * kw)
        return (product * self.scale).reshape(weight.shape).to(weight.dtype)


@dataclasses.dataclass
class LoraState:
    """What a pipeline's LoRA adapters are: per adapter, per component, per module the pair."""

    adapters: dict[str, dict[str, dict[str, LoraPair]]] = dataclasses.field(default_factory=dict)
    active: list[str] = dataclasses.field(default_factory=list)
    weights: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # adapter -> component -> w
    fused: dict[tuple[str, str, str], torch.Tensor] = dataclasses.field(default_factory=dict)  # added deltas
    hooks: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    scale: float = 1.0  # this call's LoRA scale on top of the adapter weights (cross_attention_kwargs["scale"])


# ---- reading files ---------------------------------------------------------------------------------------------


def read_lora_file(
    source: str | os.PathLike | Mapping[str, torch.Tensor], *, weight_name: str | None, hub_kwargs: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA state dict and its metadata from a dict, a file, a folder, or a Hub repo."""
    from stablepipe.loading.checkpoint import read_checkpoint
    from stablepipe.loading.files import fetch_file, is_local

    if isinstance(source, Mapping):
        return dict(source), {}
    path = Path(source)
    if not path.is_file():
        if is_local(source) or weight_name is not None or "/" in str(source):
            path = fetch_file(source, weight_name or DEFAULT_WEIGHT_NAME, **hub_kwargs)
        else:
            raise FileNotFoundError(f"no LoRA file, folder or Hub repo at {source}")
    checkpoint = read_checkpoint(path)
    return checkpoint.state, checkpoint.metadata


def group_pairs(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, dict[str, LoraPair]]:
    """{component: {module key as in the file: LoraPair}} for any supported layout."""
    if unsupported := [k for k in state if any(u in k for u in UNSUPPORTED)]:
        raise ValueError(
            f"this LoRA file uses a layout stablepipe does not apply (e.g. {unsupported[0]!r}: LyCORIS LoHa/LoKr, "
            "DoRA or full-weight diffs); plain LoRA (down/up pairs) is supported"
        )
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    for key, tensor in state.items():
        for old, new in OLD_PROCESSOR:
            key = old.sub(new, key)
        ending = next((e for e in ROLES if key.endswith(e)), None)
        if ending is None:
            continue
        component, module = split_component(key[: -len(ending)])
        parts.setdefault(component, {}).setdefault(module, {})[ROLES[ending]] = tensor
    alphas = metadata_alphas(metadata)
    pairs: dict[str, dict[str, LoraPair]] = {}
    for component, modules in parts.items():
        for module, part in modules.items():
            if "down" not in part or "up" not in part:
                lacking = "up" if "down" in part else "down"
                raise ValueError(f"LoRA file: {component} layer {module!r} lacks its {lacking} weight")
            alpha = part.get("alpha")
            alpha = float(alpha) if alpha is not None else alphas.get(component)
            pairs.setdefault(component, {})[module] = LoraPair(part["down"], part["up"], alpha)
    if not pairs:
        raise ValueError("no LoRA weights found: expected lora_A/lora_B or lora_down/lora_up keys")
    return pairs


def split_component(key: str) -> tuple[str, str]:
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return component, "kohya:" + key[len(prefix) :]
    for component in COMPONENTS:
        if key.startswith(component + "."):
            return component, key[len(component) + 1 :]
    return "unet", key  # a bare PEFT state dict of the UNet


def metadata_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """The per-component `lora_alpha` diffusers writes into the safetensors header (PEFT's LoraConfig)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
        return {c: float(config[f"{c}.lora_alpha"]) for c in COMPONENTS if f"{c}.lora_alpha" in config}
    except (ValueError, TypeError, RecursionError) as err:
        raise ValueError(
            f"this LoRA file's lora_adapter_metadata is not a JSON object with numeric lora_alpha values ({err}); "
            "the file is damaged: download it again"
        ) from None


# ---- finding the layers -------------------------------------------------------------------------------------


def is_ip_adapter_layer(name: str) -> bool:
    """An IP-Adapter's own projection (its image projection, its attention processors' key/value layers): loaded
    with the adapter, not adaptable by a LoRA, and absent from the original checkpoints' key maps."""
    return name.startswith("encoder_hid_proj") or ".processor." in name


def module_table(component: str, model: torch.nn.Module) -> dict[str, str]:
    """Every name a LoRA file may use for an adaptable layer of `model` -> that layer's module name."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
             and not is_ip_adapter_layer(n)]  # fmt: skip
    flat = component.startswith("text_encoder") and not hasattr(model, "text_model")
    spellings = {n: [n, *(["text_model." + n] if flat and not n.startswith("text_projection") else [])] for n in names}
    if component == "unet" and hasattr(model, "config"):  # SDXL kohya files use the original (ldm) names
        from stablepipe.loading.key_maps import KeyMap, unet_rules

        original, _ = KeyMap(unet_rules(model.config)).to_theirs({n + ".weight": torch.empty(0) for n in names})
        for key, ours in zip(original, names, strict=True):
            spellings[ours].append(key.removesuffix(".weight"))
    table = {}
    for name, options in spellings.items():
        for option in options:
            table[option] = name
            table["kohya:" + option.replace(".", "_")] = name
    return table


def resolve_pairs(pipe, pairs: dict[str, dict[str, LoraPair]]) -> dict[str, dict[str, LoraPair]]:
    """The file's layer names -> the pipeline's modules, with every shape checked."""
    resolved: dict[str, dict[str, LoraPair]] = {}
    for component, modules in pairs.items():
        model = getattr(pipe, component, None)
        if model is None:
            raise ValueError(f"the LoRA has weights for {component!r}, which this {type(pipe).__name__} does not have")
        table = module_table(component, model)
        if missing := [m.removeprefix("kohya:") for m in modules if m not in table]:
            raise ValueError(
                f"the LoRA targets {len(missing)} {component} layers this model does not have, e.g. {missing[:3]}; "
                "is it made for another model family (SD 1.x / 2.x / XL)?"
            )
        resolved[component] = {table[m]: fit_pair(model.get_submodule(table[m]), pair, table[m])
                               for m, pair in modules.items()}
    return resolved


def fit_pair(layer: torch.nn.Module, pair: LoraPair, name: str) -> LoraPair:
    """Shape the pair for its layer (linear: 2-D; conv: down as the layer's kernel, up 1x1) and check it."""
    out_features, in_features = layer.weight.shape[:2]
    down, up = pair.down, pair.up
    if isinstance(layer, torch.nn.Linear):
        down, up = down.flatten(1), up.flatten(1)
    elif down.ndim == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    if down.shape[1] != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"LoRA layer {name}: down {tuple(pair.down.shape)} / up {tuple(pair.up.shape)} do not fit the model's "
            f"weight {tuple(layer.weight.shape)}; the LoRA belongs to another model"
        )
    return LoraPair(down, up, pair.alpha)


# ---- running ---------------------------------------------------------------------------------------------------


def lora_output(layer: torch.nn.Module, pair: LoraPair, x: torch.Tensor) -> torch.Tensor:
    """B(A(x)) for one layer, without the scale."""
    down, up = pair.down.to(x), pair.up.to(x)
    if isinstance(layer, torch.nn.Conv2d):
        hidden = F.conv2d(x, down, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        return F.conv2d(hidden, up)  # (B, out, h, w)
    return F.linear(F.linear(x, down), up)  # (..., out)


def make_hook(state: LoraState, component: str, module_name: str):
    def add_adapters(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not state.enabled:
            return output
        for adapter in state.active:
            pair = state.adapters[adapter].get(component, {}).get(module_name)
            if pair is None or (adapter, component, module_name) in state.fused:
                continue
            weight = state.weights.get(adapter, {}).get(component, 1.0)
            output = output + lora_output(layer, pair, args[0]) * (pair.scale * weight * state.scale)
        return output

    return add_adapters


def install_hooks(pipe, state: LoraState, resolved: dict[str, dict[str, LoraPair]]) -> None:
    for component, modules in resolved.items():
        model = getattr(pipe, component)
        for module_name in modules:
            if (component, module_name) not in state.hooks:
                hook = make_hook(state, component, module_name)
                state.hooks[component, module_name] = model.get_submodule(module_name).register_forward_hook(hook)


# ---- the pipeline API (diffusers' names) -----------------------------------------------------------------------


class LoraLoaderMixin:
    """`load_lora_weights`, `set_adapters`, `fuse_lora` ... for any pipeline with a UNet and text encoders."""

    @property
    def _lora(self) -> LoraState:
        if "_lora_state" not in self.__dict__:
            self.__dict__["_lora_state"] = LoraState()
        return self.__dict__["_lora_state"]

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        *,
        weight_name: str | None = None,
        **hub_kwargs: Any,
    ) -> None:
        """Add a LoRA (file, folder, Hub repo or state dict) as adapter `adapter_name` and make it the active one."""
        state = self._lora
        name = adapter_name or f"default_{len(state.adapters)}"
        if name in state.adapters:
            raise ValueError(f"an adapter named {name!r} is loaded already; pick another adapter_name")
        tensors, metadata = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name=weight_name,
                                           hub_kwargs=hub_kwargs)
        resolved = resolve_pairs(self, group_pairs(tensors, metadata))
        state.adapters[name] = resolved
        install_hooks(self, state, resolved)
        state.active = [name]
        state.weights[name] = {}

    def set_adapters(
        self, adapter_names: str | list[str], adapter_weights: float | dict | list[float | dict] | None = None
    ) -> None:
        """Activate these adapters with these weights: a number, or {"unet": w, "text_encoder": w, ...}."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if unknown := [n for n in names if n not in self._lora.adapters]:
            raise ValueError(f"unknown adapters {unknown}; loaded: {list(self._lora.adapters)}")
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} adapter_weights for {len(names)} adapters")
        for name, weight in zip(names, weights):
            if isinstance(weight, Mapping):
                if bad := sorted(set(weight) - set(COMPONENTS)):
                    raise ValueError(f"adapter weights by component take {COMPONENTS}, not {bad}")
                self._lora.weights[name] = {k: finite_lora_weight(v, f"adapter_weights[{name!r}][{k!r}]")
                                            for k, v in weight.items()}
            else:
                value = 1.0 if weight is None else finite_lora_weight(weight, f"adapter_weights for {name!r}")
                self._lora.weights[name] = dict.fromkeys(COMPONENTS, value)
        self._lora.active = names

    def get_active_adapters(self) -> list[str]:
        return list(self._lora.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        listing: dict[str, list[str]] = {}
        for name, components in self._lora.adapters.items():
            for component in components:
                listing.setdefault(component, []).append(name)
        return listing

    @contextlib.contextmanager
    def lora_scale(self, scale: float | None) -> Iterator[None]:
        """Unfused adapters scaled by `scale` inside the block (None: unchanged), as diffusers'
        `cross_attention_kwargs={"scale": s}` scales them for one pipeline call."""
        state = self._lora
        previous = state.scale
        state.scale = previous if scale is None else float(scale)
        try:
            yield
        finally:
            state.scale = previous

    def disable_lora(self) -> None:
        self._lora.enabled = False

    def enable_lora(self) -> None:
        self._lora.enabled = True

    def fuse_lora(
        self, components: list[str] | tuple[str, ...] = COMPONENTS, lora_scale: float = 1.0,
        safe_fusing: bool = False, adapter_names: list[str] | None = None,
    ) -> None:
        """Add the active (or named) adapters' weighted deltas into the weights: no per-call cost afterwards."""
        lora_scale = finite_lora_weight(lora_scale, "lora_scale")
        state = self._lora
        for adapter in adapter_names or state.active:
            for component, modules in state.adapters[adapter].items():
                if component not in components:
                    continue
                for module_name, pair in modules.items():
                    key = (adapter, component, module_name)
                    if key in state.fused:
                        continue
                    layer = getattr(self, component).get_submodule(module_name)
                    weight = state.weights.get(adapter, {}).get(component, 1.0)
                    delta = pair.delta(layer.weight) * (lora_scale * weight)
                    if safe_fusing and not torch.isfinite(delta).all():
                        raise ValueError(f"LoRA {adapter!r} gives non-finite weights in {component}.{module_name}")
                    layer.weight.data += delta
                    state.fused[key] = delta

    def unfuse_lora(self, components: list[str] | tuple[str, ...] = COMPONENTS) -> None:
        """Take fused deltas out of the weights again."""
        state = self._lora
        for key in [k for k in state.fused if k[1] in components]:
            layer = getattr(self, key[1]).get_submodule(key[2])
            layer.weight.data -= state.fused.pop(key)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        state = self._lora
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if any(k[0] == name for k in state.fused):
                raise ValueError(f"adapter {name!r} is fused into the weights; call unfuse_lora() first")
            state.adapters.pop(name, None)
            state.weights.pop(name, None)
            state.active = [a for a in state.active if a != name]

    def unload_lora_weights(self) -> None:
        """Remove every adapter and its hooks. Fused deltas stay in the weights (as in diffusers)."""
        state = self._lora
        for handle in state.hooks.values():
            handle.remove()
        self.__dict__["_lora_state"] = LoraState()
