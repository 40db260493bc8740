"""LoRA: kohya / AUTOMATIC1111 and diffusers / PEFT files applied to tiny models give diffusers' images;
several adapters with weights; fuse / unfuse; unload; clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff
from fixtures_sdxl import sdxl_folder  # noqa: F401  (fixture)

import stablepipe
from stablepipe.loading.checkpoint import write_checkpoint

TOLERANCE = 2e-3
RUN = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def image(pipe, prompt="a red circle", seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**RUN, **kwargs}).images


def load_both(folder, name="StableDiffusionPipeline"):
    import diffusers

    return getattr(stablepipe, name).from_pretrained(folder), getattr(diffusers, name).from_pretrained(folder)


def pair(out_features: int, in_features: int, rank: int, generator: torch.Generator, kernel: int = 0):
    """A random LoRA pair, large enough to change the picture clearly."""
    down_shape = (rank, in_features, kernel, kernel) if kernel else (rank, in_features)
    up_shape = (out_features, rank, 1, 1) if kernel else (out_features, rank)
    return torch.randn(down_shape, generator=generator) * 0.3, torch.randn(up_shape, generator=generator) * 0.3


TEXT_LAYERS = {"self_attn_q_proj": (32, 32), "self_attn_k_proj": (32, 32), "self_attn_v_proj": (32, 32),
               "self_attn_out_proj": (32, 32), "mlp_fc1": (37, 32), "mlp_fc2": (32, 37)}


def kohya_sd1_lora(pipe, seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """kohya layout for SD 1.x: attention, a 1x1 conv (proj_in), a 3x3 conv (LoCon) and the text encoder."""
    g = torch.Generator().manual_seed(seed)
    unet = {
        "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": pipe.unet.down_blocks[1].attentions[0]
        .transformer_blocks[0].attn1.to_q,
        "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": pipe.unet.down_blocks[1].attentions[0]
        .transformer_blocks[0].attn2.to_k,
        "up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2": pipe.unet.up_blocks[0].attentions[1]
        .transformer_blocks[0].ff.net[2],
        "mid_block_attentions_0_proj_in": pipe.unet.mid_block.attentions[0].proj_in,
        "down_blocks_0_resnets_1_conv1": pipe.unet.down_blocks[0].resnets[1].conv1,
    }
    state = {}
    for name, layer in unet.items():
        kernel = layer.kernel_size[0] if isinstance(layer, torch.nn.Conv2d) else 0
        down, up = pair(layer.weight.shape[0], layer.weight.shape[1], rank, g, kernel)
        state |= {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                  f"lora_unet_{name}.alpha": torch.tensor(float(rank * 2))}
    for i in range(2):  # as kohya trains them: every attention projection (diffusers needs out_proj) and the MLP
        for proj, (out_features, in_features) in TEXT_LAYERS.items():
            down, up = pair(out_features, in_features, rank, g)
            key = f"lora_te_text_model_encoder_layers_{i}_{proj}"
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    return state


def peft_lora(pipe, seed: int = 1, rank: int = 4) -> dict[str, torch.Tensor]:
    """diffusers / PEFT layout: `unet.<module>.lora_A.weight` and `text_encoder.<module>.lora_B.weight`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_out.0")):
            down, up = pair(layer.weight.shape[0], layer.weight.shape[1], rank, g)
            state |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
    for i in range(3):
        down, up = pair(32, 32, rank, g)
        module = f"text_encoder.text_model.encoder.layers.{i}.self_attn.k_proj"
        state |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    return state


LAYOUTS = {"kohya": kohya_sd1_lora, "peft": peft_lora}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_file_matches_diffusers(sd1_folder, tmp_path, layout):
    ours, theirs = load_both(sd1_folder)
    before = image(ours)
    path = write_checkpoint(LAYOUTS[layout](ours), tmp_path / "lora.safetensors")
    ours.load_lora_weights(path, adapter_name="style")
    theirs.load_lora_weights(str(path), adapter_name="style")
    a, b = image(ours), image(theirs)
    assert max_diff(a, b) < TOLERANCE
    assert max_diff(a, before) > 0.02  # the LoRA really changes the picture
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["style"]


def test_peft_file_with_alpha_metadata_written_by_diffusers(sd1_folder, tmp_path):
    """diffusers' own save_lora_weights (alpha != rank, in the file's metadata)."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ours, theirs = load_both(sd1_folder)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "ff.net.2"], init_lora_weights="gaussian")
    theirs.unet.add_adapter(config)
    unet_layers = get_peft_model_state_dict(theirs.unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=unet_layers, unet_lora_adapter_metadata=config.to_dict()
    )
    fresh = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder)
    fresh.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    ours.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    assert max_diff(image(ours), image(fresh)) < TOLERANCE
    pairs = ours._lora.adapters["default_0"]["unet"]
    assert {p.scale for p in pairs.values()} == {4.0}  # lora_alpha 16 / r 4, from the file's metadata


def test_sdxl_kohya_original_names_match_diffusers(request, tmp_path):
    """SDXL kohya files name UNet layers as the original model does (input_blocks.4.1 ...), and both encoders."""
    ours, theirs = load_both(request.getfixturevalue("sdxl_folder"), "StableDiffusionXLPipeline")
    g = torch.Generator().manual_seed(5)
    state = {}
    targets = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (64, 64),
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k": (64, 64),
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": (64, 256),
        "lora_unet_output_blocks_1_1_proj_out": (64, 64),
        **{f"lora_te1_text_model_encoder_layers_0_{name}": shape for name, shape in TEXT_LAYERS.items()},
        **{f"lora_te2_text_model_encoder_layers_1_{name}": shape for name, shape in TEXT_LAYERS.items()},
    }
    for key, (out_features, in_features) in targets.items():
        down, up = pair(out_features, in_features, 4, g)
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
    path = write_checkpoint(state, tmp_path / "xl.safetensors")
    ours.load_lora_weights(path)
    theirs.load_lora_weights(str(path))
    assert set(ours.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert max_diff(image(ours), image(theirs)) < TOLERANCE


def test_set_adapters_with_weights_matches_diffusers(sd1_folder, tmp_path):
    ours, theirs = load_both(sd1_folder)
    files = {name: write_checkpoint(LAYOUTS[name](ours), tmp_path / f"{name}.safetensors") for name in LAYOUTS}
    for pipe in (ours, theirs):
        for name, path in files.items():
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(["kohya", "peft"], adapter_weights=[0.5, 1.3])
    assert max_diff(image(ours), image(theirs)) < TOLERANCE
    for pipe in (ours, theirs):
        pipe.set_adapters(["kohya", "peft"], adapter_weights=[{"unet": 0.7, "text_encoder": 0.0}, 1.0])
    assert max_diff(image(ours), image(theirs)) < TOLERANCE
    for pipe in (ours, theirs):
        pipe.set_adapters("peft")
    assert max_diff(image(ours), image(theirs)) < TOLERANCE


def test_fuse_unfuse_unload(sd1_folder, tmp_path):
    ours, theirs = load_both(sd1_folder)
    plain = image(ours)
    original = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    path = write_checkpoint(kohya_sd1_lora(ours), tmp_path / "lora.safetensors")
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(path), adapter_name="a")
        pipe.set_adapters("a", 0.8)
    hooked = image(ours)
    for pipe in (ours, theirs):
        pipe.fuse_lora(lora_scale=0.5)
    fused = image(ours)
    assert max_diff(fused, image(theirs)) < TOLERANCE
    assert max_diff(fused, hooked) > 0.01  # lora_scale 0.5 halves the (0.8-weighted) delta
    layer = "down_blocks.0.resnets.1.conv1.weight"
    assert not torch.equal(ours.unet.state_dict()[layer], original[layer])
    ours.unfuse_lora()
    assert max(float((ours.unet.state_dict()[k] - v).abs().max()) for k, v in original.items()) < 1e-5
    assert max_diff(image(ours), hooked) < 1e-4
    ours.fuse_lora()
    ours.unload_lora_weights()  # the fused weights stay, the hooks go
    assert ours.get_active_adapters() == [] and max_diff(image(ours), hooked) < 1e-4
    ours.unfuse_lora()  # nothing left to unfuse
    fresh = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    fresh.load_lora_weights(path)
    fresh.unload_lora_weights()
    assert max_diff(image(fresh), plain) == 0.0


def test_disable_enable_and_delete(sd1_folder, tmp_path):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    plain = image(pipe)
    pipe.load_lora_weights(kohya_sd1_lora(pipe), adapter_name="k")
    with_lora = image(pipe)
    pipe.disable_lora()
    assert max_diff(image(pipe), plain) == 0.0
    pipe.enable_lora()
    assert max_diff(image(pipe), with_lora) == 0.0
    pipe.delete_adapters("k")
    assert max_diff(image(pipe), plain) == 0.0 and pipe.get_list_adapters() == {}


def test_lora_errors(sd1_folder, tmp_path):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    lora = kohya_sd1_lora(pipe)
    pipe.load_lora_weights(lora, adapter_name="x")
    with pytest.raises(ValueError, match="named 'x' is loaded already"):
        pipe.load_lora_weights(lora, adapter_name="x")
    with pytest.raises(ValueError, match="unknown adapters \\['y'\\]"):
        pipe.set_adapters("y")
    wrong = {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
             "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4)}
    with pytest.raises(ValueError, match="targets 1 unet layers this model does not have"):
        pipe.load_lora_weights(wrong)
    misfit = {k: v for k, v in lora.items() if "attn1_to_q" in k}
    misfit = {k: v[:, :16] if "lora_down" in k else v for k, v in misfit.items()}
    with pytest.raises(ValueError, match="do not fit the model's weight"):
        pipe.load_lora_weights(misfit)
    with pytest.raises(ValueError, match="LyCORIS"):
        pipe.load_lora_weights({"lora_unet_x.hada_w1_a": torch.ones(2)})
    with pytest.raises(ValueError, match="does not have"):
        pipe.load_lora_weights({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 32),
                                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(37, 4)})


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "x"])
def test_non_finite_adapter_weights_and_fuse_scales_are_refused(sd1_folder, tmp_path, weight):
    ours = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    ours.load_lora_weights(write_checkpoint(kohya_sd1_lora(ours), tmp_path / "lora.safetensors"), adapter_name="a")
    before = ours.unet.state_dict()["conv_in.weight"].clone()
    with pytest.raises(ValueError, match="adapter_weights for 'a' must be a"):
        ours.set_adapters(["a"], [weight])
    with pytest.raises(ValueError, match=r"adapter_weights\['a'\]\['unet'\] must be a"):
        ours.set_adapters(["a"], [{"unet": weight}])
    with pytest.raises(ValueError, match="lora_scale must be a"):
        ours.fuse_lora(lora_scale=weight)
    assert ours.get_active_adapters() == ["a"] and torch.equal(ours.unet.state_dict()["conv_in.weight"], before)
