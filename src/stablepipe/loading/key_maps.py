"""Key conversion between diffusers' state-dict names ("ours") and the original CompVis / Stability layouts
("theirs": what `.ckpt` / `.safetensors` single files from model sites hold), written once as data.

Each map is a list of `Rule`s built from a model's config. A rule renames a key prefix (the longest matching
prefix wins) or one exact key with a tensor transform. The same rules convert in both directions, so loading a
single file and exporting one cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

SAME, ALIAS, RENAME, CONV1X1, TRANSPOSE, QKV = "same", "alias", "rename", "conv1x1", "transpose", "qkv"


@dataclasses.dataclass(frozen=True)
class Rule:
    """`ours` <-> `theirs`: prefixes (ending in ".") when `transform` is "same" or "alias" (a prefix read but
    never written, for older spellings of a layout), else exact keys.

    "rename": the tensor as is; "conv1x1": theirs is a (O, I, 1, 1) conv weight, ours a (O, I) linear one;
    "transpose": theirs is ours.T;
    "qkv": ours is a template with "{}" for q, k, v (three tensors), theirs their concatenation on dim 0.
    """

    ours: str
    theirs: str
    transform: str = SAME


def _to_ours(tensor: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == CONV1X1:
        return tensor.reshape(tensor.shape[:2]) if tensor.ndim == 4 else tensor  # (O, I, 1, 1) -> (O, I)
    if transform == TRANSPOSE:
        return tensor.T.contiguous()
    return tensor


def _to_theirs(tensor: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == CONV1X1:
        return tensor[:, :, None, None] if tensor.ndim == 2 else tensor  # (O, I) -> (O, I, 1, 1)
    if transform == TRANSPOSE:
        return tensor.T.contiguous()
    return tensor


def _longest_prefix(key: str, prefixes: Mapping[str, str]) -> str | None:
    for end in range(len(key), 0, -1):
        if key[end - 1] == "." and key[:end] in prefixes:
            return key[:end]
    return None


class KeyMap:
    """Renames state-dict keys between our layout and an original one; `ignore`: their keys to drop."""

    def __init__(self, rules: Iterable[Rule], *, ignore: Iterable[str] = ()):
        self.rules = list(rules)
        self.ignore = tuple(ignore)
        self.prefix_to_ours = {r.theirs: r.ours for r in self.rules if r.transform in (SAME, ALIAS)}
        self.prefix_to_theirs = {r.ours: r.theirs for r in self.rules if r.transform == SAME}
        self.exact = {r.theirs: r for r in self.rules if r.transform not in (SAME, ALIAS)}
        self.exact_ours = {r.ours.format(part): (r, i) for r in self.exact.values() for i, part in enumerate("qkv")}
        self.exact_ours.update({r.ours: (r, 0) for r in self.exact.values() if r.transform != QKV})

    def to_ours(self, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Convert their keys to ours; returns the converted dict and the keys no rule matched."""
        kept = {key: tensor for key, tensor in state.items() if not (self.ignore and key.startswith(self.ignore))}
        return _convert(kept, self.exact, self._exact_to_ours, self.prefix_to_ours)

    def to_theirs(self, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Convert our keys to theirs; returns the converted dict and the keys no rule matched."""
        return _convert(state, self.exact_ours, self._exact_to_theirs, self.prefix_to_theirs)

    def _exact_to_ours(self, key: str, tensor: torch.Tensor, state) -> dict[str, torch.Tensor]:
        rule = self.exact[key]
        if rule.transform == QKV:  # their (3C, ...) -> our q, k, v, (C, ...) each
            return dict(zip([rule.ours.format(p) for p in "qkv"], tensor.chunk(3, dim=0), strict=True))
        return {rule.ours: _to_ours(tensor, rule.transform)}

    def _exact_to_theirs(self, key: str, tensor: torch.Tensor, state) -> dict[str, torch.Tensor] | None:
        rule, _ = self.exact_ours[key]
        if rule.transform != QKV:
            return {rule.theirs: _to_theirs(tensor, rule.transform)}
        parts = [state.get(rule.ours.format(p)) for p in "qkv"]  # our q, k, v -> their concatenation
        return None if any(p is None for p in parts) else {rule.theirs: torch.cat(parts, dim=0)}


def _convert(state: Mapping[str, torch.Tensor], exact: Mapping[str, Any], convert_exact, prefixes: Mapping[str, str]):
    """The pass both directions share: a key with an exact rule (in `exact`) becomes what
    `convert_exact(key, tensor, state)` returns (None: the rule cannot apply), any other is renamed by its longest
    prefix in `prefixes`. Returns (converted dict, keys left unconverted)."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in state.items():
        if key in exact:
            converted = convert_exact(key, tensor, state)
        elif (prefix := _longest_prefix(key, prefixes)) is not None:
            converted = {prefixes[prefix] + key[len(prefix) :]: tensor}
        else:
            converted = None
        if converted is None:
            unmatched.append(key)
        else:
            out.update(converted)
    return out, unmatched


# ---- the UNet ---------------------------------------------------------------------------------------------

# Inside a ResBlock: diffusers' name -> the original's (ldm.modules.diffusionmodules.openaimodel.ResBlock).
UNET_RESNET = {
    "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection.",
}
UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
UNET_EMBEDDINGS = {  # by config: SDXL's micro-conditioning, the upscaler's noise-level classes, unCLIP's
    "addition_embed_type": {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."},
    "num_class_embeds": {"class_embedding.": "label_emb."},
    "class_embed_type": {"class_embedding.linear_1.": "label_emb.0.0.", "class_embedding.linear_2.": "label_emb.0.2."},
}


def resnet_rules(ours: str, theirs: str, renames: Mapping[str, str]) -> list[Rule]:
    return [Rule(ours + o, theirs + t) for o, t in renames.items()]


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The ldm UNet (input_blocks / middle_block / output_blocks) against diffusers' down/mid/up blocks."""
    rules = [Rule(o, t) for o, t in UNET_TOP.items()]
    for key, renames in UNET_EMBEDDINGS.items():
        if config.get(key) is not None:
            rules += [Rule(o, t) for o, t in renames.items()]
    layers = config["layers_per_block"]
    layers = [layers] * len(config["down_block_types"]) if isinstance(layers, int) else list(layers)
    rules += unet_down_rules(config["down_block_types"], layers)
    rules += resnet_rules("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET)
    rules += [Rule("mid_block.attentions.0.", "middle_block.1.")]
    rules += resnet_rules("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)
    return rules + unet_up_rules(config["up_block_types"], list(reversed(layers)))


def unet_down_rules(block_types: list[str], layers: list[int]) -> list[Rule]:
    """input_blocks.0 is conv_in; then per level its resnets (+ attentions), then a downsampler but last."""
    rules, index = [], 1
    for b, block_type in enumerate(block_types):
        for i in range(layers[b]):
            rules += resnet_rules(f"down_blocks.{b}.resnets.{i}.", f"input_blocks.{index}.0.", UNET_RESNET)
            if "CrossAttn" in block_type:
                rules.append(Rule(f"down_blocks.{b}.attentions.{i}.", f"input_blocks.{index}.1."))
            index += 1
        if b < len(block_types) - 1:
            rules.append(Rule(f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{index}.0.op."))
            index += 1
    return rules


def unet_up_rules(block_types: list[str], layers: list[int]) -> list[Rule]:
    """Per level layers + 1 output blocks; the last of a level also holds the upsampler (after the attention)."""
    rules, index = [], 0
    for b, block_type in enumerate(block_types):
        attention = "CrossAttn" in block_type
        for i in range(layers[b] + 1):
            rules += resnet_rules(f"up_blocks.{b}.resnets.{i}.", f"output_blocks.{index}.0.", UNET_RESNET)
            if attention:
                rules.append(Rule(f"up_blocks.{b}.attentions.{i}.", f"output_blocks.{index}.1."))
            if i == layers[b] and b < len(block_types) - 1:
                upsampler = f"output_blocks.{index}.{2 if attention else 1}.conv."
                rules.append(Rule(f"up_blocks.{b}.upsamplers.0.conv.", upsampler))
            index += 1
    return rules


# ---- the VAE ----------------------------------------------------------------------------------------------

VAE_RESNET = {
    "norm1.": "norm1.", "conv1.": "conv1.", "norm2.": "norm2.", "conv2.": "conv2.", "conv_shortcut.": "nin_shortcut.",
}
VAE_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_mid_rules(part: str) -> list[Rule]:
    rules = resnet_rules(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET)
    rules += resnet_rules(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET)
    attention, original = f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."
    rules.append(Rule(attention + "group_norm.", original + "norm."))
    for o, t in VAE_ATTENTION.items():
        rules.append(Rule(f"{attention}{o}.weight", f"{original}{t}.weight", CONV1X1))
        rules.append(Rule(f"{attention}{o}.bias", f"{original}{t}.bias", CONV1X1))
    return rules


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The ldm AutoencoderKL (encoder.down / decoder.up, reversed) against diffusers' blocks."""
    rules = [Rule(p, p) for p in ("quant_conv.", "post_quant_conv.")]
    levels, layers = len(config["block_out_channels"]), config.get("layers_per_block", 2)
    for part in ("encoder", "decoder"):
        rules += [Rule(f"{part}.conv_in.", f"{part}.conv_in."), Rule(f"{part}.conv_out.", f"{part}.conv_out.")]
        rules += [Rule(f"{part}.conv_norm_out.", f"{part}.norm_out.")] + vae_mid_rules(part)
    for i in range(levels):
        for j in range(layers):
            rules += resnet_rules(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
        if i < levels - 1:
            rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        theirs = levels - 1 - i  # the original numbers decoder levels from the lowest resolution up
        for j in range(layers + 1):
            rules += resnet_rules(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{theirs}.block.{j}.", VAE_RESNET)
        if i < levels - 1:
            rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{theirs}.upsample.conv."))
    return rules


# ---- text encoders --------------------------------------------------------------------------------------

# transformers' CLIP names; older files lack the `text_model.` level (accepted on load, never written).
CLIP_RULES = [Rule("text_model.", "text_model.")] + [
    Rule(f"text_model.{p}", p, ALIAS) for p in ("embeddings.", "encoder.", "final_layer_norm.")
] + [Rule("text_projection.", "text_projection.")]

OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def open_clip_rules(num_layers: int, *, projection: bool) -> list[Rule]:
    """OpenCLIP's text tower (SD 2.x, SDXL's second encoder) against transformers' CLIPTextModel."""
    rules = [
        Rule("text_model.embeddings.token_embedding.", "token_embedding."),
        Rule("text_model.embeddings.position_embedding.weight", "positional_embedding", RENAME),
        Rule("text_model.final_layer_norm.", "ln_final."),
    ]
    if projection:
        rules.append(Rule("text_projection.weight", "text_projection", TRANSPOSE))
    for i in range(num_layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        rules += resnet_rules(ours, theirs, OPEN_CLIP_LAYER)
        rules.append(Rule(ours + "self_attn.{}_proj.weight", theirs + "attn.in_proj_weight", QKV))
        rules.append(Rule(ours + "self_attn.{}_proj.bias", theirs + "attn.in_proj_bias", QKV))
    return rules
