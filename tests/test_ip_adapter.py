"""IP-Adapters: tiny random adapter files in the original layout, loaded in stablepipe and in diffusers, same
pictures (embeds given, or through a tiny CLIP image encoder), scales, unloading, several adapters, masks, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_diff
from fixtures_image import TOLERANCE, load_both, run_both, sample_image, sample_mask

import stablepipe

IMAGE_EMBED_DIM = 32  # the tiny image encoder's projection width (plain adapter input)
VISION_WIDTH = 48  # its hidden size (Plus adapter input)


def cross_attention_widths(unet) -> list[tuple[int, int]]:
    """(hidden, context width) of each cross-attention of a diffusers UNet, in its `attn_processors` order."""
    modules = dict(unet.named_modules())
    names = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    return [(modules[n].to_k.out_features, modules[n].to_k.in_features) for n in names]


def ip_layer_weights(unet, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The "ip_adapter" part: keys 1, 3, 5, ... for the cross-attentions, as the released files number them."""
    weights = {}
    for i, (hidden, width) in enumerate(cross_attention_widths(unet)):
        for kind in ("k", "v"):
            weights[f"{2 * i + 1}.to_{kind}_ip.weight"] = torch.randn(hidden, width, generator=generator) * 0.3
    return weights


def plain_adapter(unet, seed: int, tokens: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(tokens * width, IMAGE_EMBED_DIM, generator=g) * 0.2,
        "proj.bias": torch.randn(tokens * width, generator=g) * 0.1,
        "norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
        "norm.bias": 0.1 * torch.randn(width, generator=g),
    }
    return {"image_proj": image_proj, "ip_adapter": ip_layer_weights(unet, g)}


def plus_adapter(unet, seed: int, depth: int = 4, queries: int = 4, hidden: int = 64):
    """An IP-Adapter Plus (Perceiver resampler) in the original key names: 4 layers (diffusers builds 4), heads
    of 64 channels."""
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    image_proj = {"latents": r(1, queries, hidden), "proj_in.weight": r(hidden, VISION_WIDTH),
                  "proj_in.bias": r(hidden), "proj_out.weight": r(width, hidden), "proj_out.bias": r(width),
                  "norm_out.weight": 1 + r(width, scale=0.1), "norm_out.bias": r(width, scale=0.1)}  # fmt: skip
    for i in range(depth):
        p = f"layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            image_proj[f"{p}{norm}.weight"], image_proj[f"{p}{norm}.bias"] = 1 + r(hidden, scale=0.1), r(hidden)
        image_proj.update({f"{p}0.to_q.weight": r(64, hidden), f"{p}0.to_kv.weight": r(128, hidden),
                           f"{p}0.to_out.weight": r(hidden, 64), f"{p}1.1.weight": r(4 * hidden, hidden),
                           f"{p}1.3.weight": r(hidden, 4 * hidden)})  # fmt: skip
    return {"image_proj": image_proj, "ip_adapter": ip_layer_weights(unet, g)}


def face_id_adapter(unet, seed: int, tokens: int = 4, mult: int = 2, rank: int = 4):
    """An IP-Adapter FaceID: an MLP on a face-ID embedding, and LoRA weights for every attention layer
    ("{n}.to_q_lora.down.weight" ..., n counting the layers in `attn_processors` order)."""
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    image_proj = {"proj.0.weight": torch.randn(mult * IMAGE_EMBED_DIM, IMAGE_EMBED_DIM, generator=g) * 0.2,
                  "proj.0.bias": torch.randn(mult * IMAGE_EMBED_DIM, generator=g) * 0.1,
                  "proj.2.weight": torch.randn(tokens * width, mult * IMAGE_EMBED_DIM, generator=g) * 0.2,
                  "proj.2.bias": torch.randn(tokens * width, generator=g) * 0.1,
                  "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}  # fmt: skip
    ip_adapter = ip_layer_weights(unet, g)
    modules = dict(unet.named_modules())
    for n, name in enumerate(unet.attn_processors):
        attn = modules[name.removesuffix(".processor")]
        for kind, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            ip_adapter[f"{n}.{kind}_lora.down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
            ip_adapter[f"{n}.{kind}_lora.up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_image_encoder(folder) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=37, num_attention_heads=4,
                              num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=IMAGE_EMBED_DIM)
    torch.manual_seed(5)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)


@pytest.fixture(scope="session")
def adapter_repo(sd1_folder, tmp_path_factory):
    """A folder as the Hub's h94/IP-Adapter: models/ with a .safetensors and a .bin adapter and image_encoder/."""
    import diffusers
    from safetensors.torch import save_file

    unet = diffusers.UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    root = tmp_path_factory.mktemp("ip_adapter")
    models = root / "models"
    models.mkdir()
    plain = plain_adapter(unet, seed=1)
    save_file({f"{part}.{k}": v.contiguous() for part, d in plain.items() for k, v in d.items()},
              models / "ip-adapter_tiny.safetensors")  # fmt: skip
    torch.save(plus_adapter(unet, seed=2), models / "ip-adapter-plus_tiny.bin")
    write_image_encoder(models / "image_encoder")
    return root


def load_with_adapters(sd1_folder, adapter_repo, weight_name, cls_name="StableDiffusionPipeline", **kwargs):
    ours, theirs = load_both(cls_name, sd1_folder)
    for pipe in (ours, theirs):
        pipe.load_ip_adapter(adapter_repo, subfolder="models", weight_name=weight_name, **kwargs)
    return ours, theirs


def image_embeds(guided: bool, seed: int = 3, shape=(1, IMAGE_EMBED_DIM)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    positive = torch.randn(1, *shape, generator=g)
    return [torch.cat([torch.randn(1, *shape, generator=g), positive]) if guided else positive]


PROMPT = dict(prompt="a red circle", height=32, width=32)


# ---- the UNet alone ---------------------------------------------------------------------------------------------


def test_unet_matches_diffusers_with_two_adapters_and_masks(sd1_folder):
    import diffusers

    theirs = diffusers.UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    ours = stablepipe.UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    assert list(ours.attn_processors) == list(theirs.attn_processors)  # the order that numbers the file keys
    adapters = [plain_adapter(theirs, 1), plus_adapter(theirs, 2)]
    for unet in (ours, theirs):
        unet._load_ip_adapter_weights(adapters)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=g), torch.randn(2, 2, 5, VISION_WIDTH, generator=g)]
    mask = torch.zeros(1, 2, 32, 32)
    mask[:, 0, :, :16], mask[:, 1, :, 16:] = 1, 1
    outputs = []
    for kwargs in ({}, {"cross_attention_kwargs": {"ip_adapter_masks": [None, mask]}}):
        with torch.no_grad():
            a = ours(x, 10, text, added_cond_kwargs={"image_embeds": embeds}, **kwargs).sample
            b = theirs(x, 10, text, added_cond_kwargs={"image_embeds": embeds}, **kwargs).sample
        assert (a - b).abs().max() < 1e-5
        outputs.append(a)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # the mask changes the picture
    ours._unload_ip_adapter_weights()
    assert ours.encoder_hid_proj is None and ours.config.encoder_hid_dim_type is None
    with torch.no_grad():
        plain = ours(x, 10, text).sample
        reference = diffusers.UNet2DConditionModel.from_pretrained(sd1_folder / "unet")(x, 10, text).sample
    assert (plain - reference).abs().max() < 1e-5


def test_unet_refuses_missing_or_foreign_adapter_inputs(sd1_folder):
    import diffusers

    theirs = diffusers.UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    ours = stablepipe.UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    adapter = plain_adapter(theirs, 1)
    short = {"image_proj": adapter["image_proj"], "ip_adapter": {k: v for k, v in adapter["ip_adapter"].items()
                                                                  if not k.startswith("11.")}}  # fmt: skip
    with pytest.raises(ValueError, match="no '11.to_k_ip.weight'"):
        ours._load_ip_adapter_weights(short)
    with pytest.raises(ValueError, match="needs 'image_proj' and 'ip_adapter'"):
        ours._load_ip_adapter_weights({"proj.weight": torch.zeros(1)})
    ours._load_ip_adapter_weights(adapter)
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match="IP-Adapters loaded: pass added_cond_kwargs"):
        ours(x, 10, text)
    with pytest.raises(ValueError, match=r"takes \(batch, n_images, \[tokens,\] 32\)"):
        ours(x, 10, text, added_cond_kwargs={"image_embeds": [torch.randn(1, 1, 7)]})


# ---- pipelines ---------------------------------------------------------------------------------------------------

EMBEDS_CASES = {
    "guided": dict(guidance_scale=7.5),
    "unguided": dict(guidance_scale=1.0),
    "batch": dict(guidance_scale=7.5, prompt=["a red circle", "a blue square"], num_images_per_prompt=2),
}


@pytest.mark.parametrize("case", EMBEDS_CASES)
def test_text_to_image_with_embeds_matches_diffusers(sd1_folder, adapter_repo, case):
    ours, theirs = load_with_adapters(sd1_folder, adapter_repo, "ip-adapter_tiny.safetensors")
    call = {**PROMPT, **EMBEDS_CASES[case]}
    embeds = image_embeds(call["guidance_scale"] > 1)
    diff, images = run_both(ours, theirs, ip_adapter_image_embeds=embeds, **call)
    assert diff < TOLERANCE, f"{case}: max abs diff {diff}"
    _, without = run_both(ours, theirs, **{**call, "ip_adapter_image_embeds": [embeds[0] * 0]})
    assert max_diff(images, without) > 1e-2  # the image prompt is used


def test_text_to_image_with_an_image_through_the_image_encoder(sd1_folder, adapter_repo):
    ours, theirs = load_with_adapters(sd1_folder, adapter_repo, "ip-adapter_tiny.safetensors")
    assert type(ours.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert ours.feature_extractor.crop_size == theirs.feature_extractor.crop_size
    diff, _ = run_both(ours, theirs, ip_adapter_image=sample_image(40, 36), num_images_per_prompt=2, **PROMPT)
    assert diff < TOLERANCE
    embeds = ours.prepare_ip_adapter_image_embeds(sample_image(40, 36), None, "cpu", 1, True)
    reference = theirs.prepare_ip_adapter_image_embeds(sample_image(40, 36), None, "cpu", 1, True)
    assert embeds[0].shape == (2, 1, IMAGE_EMBED_DIM) and torch.allclose(embeds[0], reference[0], atol=1e-6)


def test_image_to_image_matches_diffusers(sd1_folder, adapter_repo):
    ours, theirs = load_with_adapters(sd1_folder, adapter_repo, "ip-adapter_tiny.safetensors",
                                      cls_name="StableDiffusionImg2ImgPipeline")  # fmt: skip
    base = dict(prompt="a red circle", image=sample_image(), strength=0.75, num_inference_steps=4)
    for guidance in (7.5, 1.0):
        diff, _ = run_both(ours, theirs, ip_adapter_image_embeds=image_embeds(guidance > 1), guidance_scale=guidance,
                           **base)  # fmt: skip
        assert diff < TOLERANCE, f"guidance {guidance}: max abs diff {diff}"
    diff, _ = run_both(ours, theirs, ip_adapter_image=sample_image(seed=4), **base)
    assert diff < TOLERANCE


def test_inpainting_matches_diffusers(sd1_folder, adapter_repo):
    ours, theirs = load_with_adapters(sd1_folder, adapter_repo, "ip-adapter_tiny.safetensors",
                                      cls_name="StableDiffusionInpaintPipeline")  # fmt: skip
    base = dict(prompt="a red circle", image=sample_image(), mask_image=sample_mask(), strength=0.75, num_inference_steps=4)
    for guidance in (7.5, 1.0):
        diff, _ = run_both(ours, theirs, ip_adapter_image_embeds=image_embeds(guidance > 1), guidance_scale=guidance,
                           **base)  # fmt: skip
        assert diff < TOLERANCE, f"guidance {guidance}: max abs diff {diff}"


def test_lora_on_top_of_an_ip_adapter_matches_diffusers(sd1_folder, adapter_repo, tmp_path):
    """A LoRA file loaded after an IP-Adapter: the adapter's own layers are not LoRA targets (nor in the key maps)."""
    from test_lora import kohya_sd1_lora

    from stablepipe.loading.checkpoint import write_checkpoint

    ours, theirs = load_with_adapters(sd1_folder, adapter_repo, "ip-adapter_tiny.safetensors")
    path = write_checkpoint(kohya_sd1_lora(ours), tmp_path / "lora.safetensors")
    ours.load_lora_weights(path, adapter_name="style")
    theirs.load_lora_weights(str(path), adapter_name="style")
    diff, _ = run_both(ours, theirs, ip_adapter_image_embeds=image_embeds(True), **PROMPT)
    assert diff < TOLERANCE


def test_step_cache_shallow_step_reads_the_adapter_image_tokens():
    """The outermost level (all the step cache runs) has cross-attention here, so it must see the image tokens."""
    from conftest import SD1_UNET

    from stablepipe.pipelines.step_cache import StepCachedUNet

    torch.manual_seed(0)
    unet = stablepipe.UNet2DConditionModel(**dict(
        SD1_UNET, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )).eval()  # fmt: skip
    unet._load_ip_adapter_weights([plain_adapter(unet, 1)])
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    kwargs = {"added_cond_kwargs": {"image_embeds": [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=g)]}}
    cached = StepCachedUNet(unet, 2)
    with torch.no_grad():
        full = cached(x, 10, text, return_dict=False, **kwargs)[0]
        shallow = cached(x, 10, text, return_dict=False, **kwargs)[0]  # the second call: the shallow path
    assert cached.calls == 2 and (shallow - full).abs().max().item() < 1e-5


def test_plus_adapter_from_a_bin_file_with_the_image_encoder(sd1_folder, adapter_repo):
    ours, theirs = load_with_adapters(sd1_folder, adapter_repo, "ip-adapter-plus_tiny.bin")
    assert type(ours.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterPlusImageProjection"
    diff, _ = run_both(ours, theirs, ip_adapter_image=sample_image(seed=4), **PROMPT)
    assert diff < TOLERANCE


def test_scales_per_block_and_unload(sd1_folder, adapter_repo):
    ours, theirs = load_with_adapters(sd1_folder, adapter_repo, "ip-adapter_tiny.safetensors")
    embeds = image_embeds(True)
    _, full = run_both(ours, theirs, ip_adapter_image_embeds=embeds, **PROMPT)
    for scale in (0.4, {"up": {"block_0": [0.0, 1.0, 0.0]}}, {"down": 0.7, "mid": [0.2]}):
        for pipe in (ours, theirs):
            pipe.set_ip_adapter_scale(scale)
        diff, scaled = run_both(ours, theirs, ip_adapter_image_embeds=embeds, **PROMPT)
        assert diff < TOLERANCE, f"scale {scale}: max abs diff {diff}"
        assert max_diff(scaled, full) > 1e-3
    for pipe in (ours, theirs):
        pipe.set_ip_adapter_scale(0.0)
    _, off = run_both(ours, theirs, ip_adapter_image_embeds=embeds, **PROMPT)
    for pipe in (ours, theirs):
        pipe.unload_ip_adapter()
    assert ours.image_encoder is None and ours.unet.encoder_hid_proj is None
    diff, plain = run_both(ours, theirs, **PROMPT)
    assert diff < TOLERANCE and max_diff(plain, off) < 1e-6  # scale 0 is the model without adapter
    with pytest.raises(ValueError, match="load_ip_adapter"):
        ours(**PROMPT, num_inference_steps=2, ip_adapter_image_embeds=embeds)


def test_two_adapters_with_masks(sd1_folder, adapter_repo):
    ours, theirs = load_with_adapters(
        sd1_folder, adapter_repo, ["ip-adapter_tiny.safetensors", "ip-adapter-plus_tiny.bin"]
    )
    for pipe in (ours, theirs):
        pipe.set_ip_adapter_scale([0.8, 0.5])
    images = [sample_image(seed=5), sample_image(seed=6)]
    diff, both = run_both(ours, theirs, ip_adapter_image=images, **PROMPT)
    assert diff < TOLERANCE
    masks = [torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)]
    masks[0][..., :16], masks[1][..., 16:] = 1, 1
    diff, masked = run_both(ours, theirs, ip_adapter_image=images, cross_attention_kwargs={"ip_adapter_masks": masks},
                            **PROMPT)  # fmt: skip
    assert diff < TOLERANCE and max_diff(masked, both) > 1e-3


def test_face_id_adapter_with_its_loras_from_a_state_dict(sd1_folder):
    ours, theirs = load_both("StableDiffusionPipeline", sd1_folder)
    adapter = face_id_adapter(theirs.unet, seed=7)
    for pipe in (ours, theirs):
        pipe.load_ip_adapter(adapter, subfolder=None, weight_name=None, image_encoder_folder=None)
    assert ours.get_list_adapters() == {"unet": ["faceid_0"]}
    embeds = [torch.randn(2, 1, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(8))]  # (2B, n, 1, D)
    diff, images = run_both(ours, theirs, ip_adapter_image_embeds=embeds, **PROMPT)
    assert diff < TOLERANCE
    ours.set_adapters(["faceid_0"], adapter_weights=[0.0])
    _, no_lora = run_both(ours, theirs, ip_adapter_image_embeds=embeds, **PROMPT)
    assert max_diff(images, no_lora) > 1e-2  # the LoRA part is applied


@pytest.fixture(scope="module")
def adapted(sd1_folder, adapter_repo):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(adapter_repo, subfolder="models", weight_name="ip-adapter_tiny.safetensors",
                         image_encoder_folder=None)  # fmt: skip
    return pipe


BAD_INPUTS = {
    "both": (dict(ip_adapter_image=sample_image(), ip_adapter_image_embeds=image_embeds(True)), "not both"),
    "count": (dict(ip_adapter_image_embeds=image_embeds(True) * 2), "2 tensors for 1 loaded IP-Adapters"),
    "not a list": (dict(ip_adapter_image_embeds=image_embeds(True)[0]), "must be a list of tensors"),
    "ndim": (dict(ip_adapter_image_embeds=[torch.randn(2, IMAGE_EMBED_DIM)]), r"expected \(batch, n_images, dim\)"),
    "odd batch": (dict(ip_adapter_image_embeds=[torch.randn(3, 1, IMAGE_EMBED_DIM)]), "negative embeds first"),
    "width": (dict(ip_adapter_image_embeds=image_embeds(True, shape=(1, 7))), "image features of the image encoder"),
    "no encoder": (dict(ip_adapter_image=sample_image()), "needs the pipeline's image_encoder"),
    "adapters vs images": (dict(ip_adapter_image=[sample_image(), sample_image()]), "one image .or a list"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error(adapted, case):
    kwargs, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        adapted(**PROMPT, num_inference_steps=2, output_type="np", **kwargs)


def test_loading_refuses_what_is_not_an_ip_adapter(sd1_folder, adapter_repo, tmp_path):
    from safetensors.torch import save_file

    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="is not an IP-Adapter"):
        pipe.load_ip_adapter(tmp_path, subfolder=None, weight_name="lora.safetensors")
    with pytest.raises(ValueError, match="3 sources, 2 subfolders and 2 weight names"):
        pipe.load_ip_adapter([adapter_repo] * 3, subfolder="models", weight_name=["a.bin", "b.bin"])
    with pytest.raises(FileNotFoundError, match="no image encoder"):
        pipe.load_ip_adapter(adapter_repo, subfolder="models", weight_name="ip-adapter_tiny.safetensors",
                             image_encoder_folder="elsewhere/image_encoder")  # fmt: skip
    assert np.isfinite(pipe.unet.conv_in.weight.detach().numpy()).all()


IP_ADAPTER_EXPORTS = {
    "IPAdapterAttnProcessor": "stablepipe.models.attention",
    "IPAdapterAttnProcessor2_0": "stablepipe.models.attention",
    "ImageProjection": "stablepipe.models.embeddings",
    "IPAdapterPlusImageProjection": "stablepipe.models.embeddings",
    "IPAdapterFaceIDImageProjection": "stablepipe.models.embeddings",
    "IPAdapterFullImageProjection": "stablepipe.models.embeddings",
    "MultiIPAdapterImageProjection": "stablepipe.models.embeddings",
    "IPAdapterMixin": "stablepipe.loading.ip_adapter",
}


@pytest.mark.parametrize("name", IP_ADAPTER_EXPORTS)
def test_ip_adapter_classes_are_public_names(name):
    import importlib

    namespace: dict[str, object] = {}
    exec(f"from stablepipe import {name}", namespace)  # the statement users write
    defined = getattr(importlib.import_module(IP_ADAPTER_EXPORTS[name]), name)
    assert isinstance(defined, type) and defined.__name__ == name
    assert namespace[name] is defined
    assert name in dir(stablepipe)
