"""Parity of stablepipe's UNet and VAE with diffusers on tiny random models saved in diffusers' layout."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from stablepipe.kernels import use_kernels
from stablepipe.models.unet import UNet2DConditionModel, unet_stages
from stablepipe.models.vae import AutoencoderKL

TOL = 1e-4
BATCH, TEXT_LEN = 2, 7


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter (norm weights and zero biases too), so each one changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def reference(cls, config: dict, folder: Path, *, seed: int = 0, **save_kwargs):
    """A seeded random diffusers model, saved to `folder`."""
    torch.manual_seed(seed)
    model = randomize(cls(**config), seed)
    model.save_pretrained(folder, **save_kwargs)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def inputs(config: dict, *, size=(16, 16), seed: int = 1) -> dict:
    """UNet inputs for a config: noisy latents, timesteps, text states, and whatever conditioning it needs."""
    g = torch.Generator().manual_seed(seed)
    cross = config["cross_attention_dim"]
    kwargs = {
        "sample": torch.randn(BATCH, config.get("in_channels", 4), *size, generator=g),
        "timestep": torch.tensor([999, 17]),
        "encoder_hidden_states": torch.randn(
            BATCH, TEXT_LEN, cross if isinstance(cross, int) else cross[0], generator=g
        ),
    }
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(BATCH, text_dim, generator=g),
            "time_ids": torch.tensor(
                [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 8.0, 1024.0, 1024.0]]
            ),
        }
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([3, config["num_class_embeds"] - 1])
    if config.get("class_embed_type") == "projection":
        kwargs["class_labels"] = torch.randn(BATCH, config["projection_class_embeddings_input_dim"], generator=g)
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(BATCH, config["time_cond_proj_dim"], generator=g)
    return kwargs


def unet_outputs(ref, ours, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        expected = ref(**kwargs).sample
        got = ours(**kwargs).sample
    return expected, got


SD1 = {
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 24,
    "attention_head_dim": 8,  # diffusers' quirk: 8 heads (of 4 and 8 channels), not 8 channels per head
    "norm_num_groups": 8,
    "sample_size": 16,
}
SD2 = {
    **SD1,
    "layers_per_block": 1,
    "attention_head_dim": (2, 4, 8),
    "use_linear_projection": True,
    "upcast_attention": True,
    "only_cross_attention": (True, False, False),
    "cross_attention_dim": 40,
    "mid_block_scale_factor": 1.5,
}
SDXL = {
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 48,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 16,
}
INPAINT = {**SD1, "in_channels": 9, "mid_block_type": "UNetMidBlock2D", "norm_eps": 1e-3}
UPSCALER_X4 = {**SD2, "in_channels": 7, "num_class_embeds": 20, "only_cross_attention": False}
LCM_LIKE = {
    **SD1,
    "time_cond_proj_dim": 16,
    "timestep_post_act": "silu",
    "mid_block_type": None,
    "conv_in_kernel": 1,
    "conv_out_kernel": 1,
}
FOURIER = {**SD1, "time_embedding_type": "fourier", "flip_sin_to_cos": False, "class_embed_type": "timestep"}
EMBEDDING_OPTIONS = {
    **SD1,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": 12,
    "class_embeddings_concat": True,
    "time_embedding_dim": 96,
    "time_embedding_act_fn": "silu",
    "center_input_sample": True,
    "freq_shift": 1,
}
PER_LAYER_DEPTHS = {
    **SDXL,
    "transformer_layers_per_block": [[1, 1], [1, 2], [2, 1]],
    "reverse_transformer_layers_per_block": [[1, 2, 1], [2, 1, 1], [1, 1, 1]],
}

UNET_CASES = {
    "sd1": (SD1, (16, 16)),
    "sd2": (SD2, (12, 10)),  # sizes not divisible by 4: the up path resizes to the skips' sizes
    "sdxl": (SDXL, (16, 16)),
    "inpaint": (INPAINT, (16, 16)),
    "x4_upscaler_class_labels": (UPSCALER_X4, (16, 16)),
    "time_cond_proj": (LCM_LIKE, (16, 16)),
    "fourier_timestep_class": (FOURIER, (16, 16)),
    "embedding_options": (EMBEDDING_OPTIONS, (16, 16)),
    "per_layer_transformer_depths": (PER_LAYER_DEPTHS, (8, 8)),
}


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_matches_diffusers(case: str, tmp_path: Path):
    config, size = UNET_CASES[case]
    ref = reference(diffusers.UNet2DConditionModel, config, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    kwargs = inputs(config, size=size)
    if case == "fourier_timestep_class":
        kwargs["timestep"] = torch.tensor([0.9, 0.02])  # noise levels, like the K-diffusion models
        kwargs["class_labels"] = torch.tensor([500, 3])
    expected, got = unet_outputs(ref, ours, kwargs)
    assert got.shape == (BATCH, config.get("out_channels", 4), *size)
    assert max_diff(expected, got) < TOL
    assert expected.abs().mean() > 0.1  # a live network, not a vanishing output


def test_unet_timestep_forms_and_tuple_output(tmp_path: Path):
    ref = reference(diffusers.UNet2DConditionModel, SD1, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    kwargs = inputs(SD1)
    outputs = []
    for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.tensor([500.5, 500.5], dtype=torch.float64)):
        expected, got = unet_outputs(ref, ours, {**kwargs, "timestep": t})
        assert max_diff(expected, got) < TOL
        outputs.append(got)
    assert max_diff(outputs[0], outputs[3]) == 0  # int, 0-d and 1-d tensors all broadcast to the batch
    assert max_diff(outputs[0], outputs[4]) > 1e-4  # a half-step apart is a different time embedding
    with torch.no_grad():
        (as_tuple,) = ours(**kwargs, return_dict=False)
        assert max_diff(as_tuple, ours(**kwargs).sample) == 0


def test_unet_config_round_trip_and_quirk(tmp_path: Path):
    ref = reference(diffusers.UNet2DConditionModel, SD1, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    assert ours.config.attention_head_dim == 8 and ours.config.cross_attention_dim == 24
    attn = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 8 and attn.to_q.weight.shape == (32, 32)  # 8 heads of 4 channels
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_block_args_keep_diffusers_head_quirks():
    """What the block builders get: heads from `attention_head_dim`; the raw value (for the latent upscaler's
    K-blocks) indexed without reversal on the way up, as diffusers does."""
    config = UNet2DConditionModel.from_config(SD2).config
    down, mid, up = unet_stages(config, temb_channels=128)
    assert [a.num_heads for a in down] == [2, 4, 8] and mid.num_heads == 8
    assert [a.num_heads for a in up] == [8, 4, 2]
    assert [a.attention_head_dim for a in up] == [2, 4, 8]
    assert [a.only_cross_attention for a in up] == [False, False, True]
    assert [(a.in_channels, a.prev_output_channels, a.out_channels) for a in up] == [
        (32, 64, 64),
        (32, 64, 32),
        (32, 32, 32),
    ]


def test_unet_bfloat16_matches_diffusers(tmp_path: Path):
    """Reduced precision: timestep features are float32, cast to the model dtype exactly as diffusers does."""
    ref = reference(diffusers.UNet2DConditionModel, SDXL, tmp_path).to(torch.bfloat16)
    ours = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    kwargs = inputs(SDXL)
    kwargs = {k: v.to(torch.bfloat16) if k in ("sample", "encoder_hidden_states") else v for k, v in kwargs.items()}
    kwargs["added_cond_kwargs"] = {k: v.to(torch.bfloat16) for k, v in kwargs["added_cond_kwargs"].items()}
    with use_kernels(False):  # aten's attention, as diffusers; the compiled kernel's error: tests/test_kernels.py
        expected, got = unet_outputs(ref, ours, kwargs)
    assert got.dtype == torch.bfloat16
    assert max_diff(expected, got) < 1e-2


def test_unet_fp16_variant_loads(tmp_path: Path):
    torch.manual_seed(3)
    ref = randomize(diffusers.UNet2DConditionModel(**SD1), 3)
    weights = ref.conv_in.weight.clone()
    ref.half().save_pretrained(tmp_path, variant="fp16")
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    ours = UNet2DConditionModel.from_pretrained(tmp_path, variant="fp16")
    assert ours.dtype == torch.float16
    ours32 = UNet2DConditionModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float32)
    expected, got = unet_outputs(ref.float(), ours32, inputs(SD1))
    assert max_diff(expected, got) < TOL
    assert 0 < max_diff(ours32.conv_in.weight, weights) < 1e-3  # float16 rounding, really read from the file


def test_our_save_loads_in_diffusers(tmp_path: Path):
    reference(diffusers.UNet2DConditionModel, SDXL, tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    expected, got = unet_outputs(back, ours, inputs(SDXL))
    assert max_diff(expected, got) == 0
    assert back.config.transformer_layers_per_block == [1, 1, 2]


def test_missing_weight_is_named_with_file(tmp_path: Path):
    reference(diffusers.UNet2DConditionModel, SD1, tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["mid_block.attentions.0.proj_in.weight"]
    save_file(state, path)
    with pytest.raises(ValueError, match="missing") as err:
        UNet2DConditionModel.from_pretrained(tmp_path)
    assert "mid_block.attentions.0.proj_in.weight" in str(err.value) and str(path) in str(err.value)


def test_wrongly_shaped_weight_is_named_with_file(tmp_path: Path):
    reference(diffusers.UNet2DConditionModel, SD1, tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = torch.zeros(32, 9, 3, 3)  # an inpainting conv_in in a 4-channel UNet
    save_file(state, path)
    with pytest.raises(ValueError, match="wrongly shaped") as err:
        UNet2DConditionModel.from_pretrained(tmp_path)
    assert "conv_in.weight" in str(err.value) and "(32, 9, 3, 3)" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("override", "key", "supported"),
    [
        ({"down_block_types": ("SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")},
         "down_block_types[0]='SimpleCrossAttnDownBlock2D'", "CrossAttnDownBlock2D"),
        ({"up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D")},
         "up_block_types[2]='AttnUpBlock2D'", "CrossAttnUpBlock2D"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
         "mid_block_type='UNetMidBlock2DSimpleCrossAttn'", "UNetMidBlock2DCrossAttn"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'", "'default'"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text'", "'text_time'"),
        ({"time_embedding_type": "learned"}, "time_embedding_type='learned'", "'fourier'"),
        ({"encoder_hid_dim": 16}, "encoder_hid_dim=16", "None"),
    ],
)  # fmt: skip
def test_unsupported_unet_config_is_refused(override: dict, key: str, supported: str):
    with pytest.raises(ValueError) as err:
        UNet2DConditionModel.from_config({**SD1, **override})
    assert key in str(err.value) and supported in str(err.value)


def test_unsupported_config_in_a_diffusers_folder_is_refused(tmp_path: Path):
    """diffusers builds a scale-shift UNet; we refuse to load it rather than build a different network."""
    reference(diffusers.UNet2DConditionModel, {**SD1, "resnet_time_scale_shift": "scale_shift"}, tmp_path)
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_missing_conditioning_is_a_clear_error(tmp_path: Path):
    ours = UNet2DConditionModel.from_config(SDXL)
    kwargs = inputs(SDXL)
    del kwargs["added_cond_kwargs"]
    with pytest.raises(ValueError, match=r"added_cond_kwargs with \['text_embeds', 'time_ids'\]"):
        ours(**kwargs)
    upscaler = UNet2DConditionModel.from_config(UPSCALER_X4)
    kwargs = inputs(UPSCALER_X4)
    del kwargs["class_labels"]
    with pytest.raises(ValueError, match="pass class_labels"):
        upscaler(**kwargs)


REAL_UNETS = {  # the released checkpoints' configs (fields that differ from the defaults)
    "sd1.5": {"cross_attention_dim": 768, "sample_size": 64},
    "sd2.1": {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
              "upcast_attention": True, "sample_size": 96},
    "sd2-inpaint": {"in_channels": 9, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                    "use_linear_projection": True},
    "sdxl-base": {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                  "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                  "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
    "sdxl-refiner": {"block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24],
                     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     "transformer_layers_per_block": 4, "cross_attention_dim": 1280, "use_linear_projection": True,
                     "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                     "projection_class_embeddings_input_dim": 2560},
    "x4-upscaler": {"block_out_channels": [256, 512, 512, 1024], "in_channels": 7, "num_class_embeds": 1000,
                    "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                    "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], "cross_attention_dim": 1024,
                    "only_cross_attention": [True, True, True, False], "use_linear_projection": True},
}  # fmt: skip


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(REAL_UNETS))
def test_real_unet_configs_have_diffusers_parameter_names(name: str):
    """Full-size networks, built on the meta device: every name and shape of the real checkpoints."""
    with torch.device("meta"):
        expected = shapes(diffusers.UNet2DConditionModel(**REAL_UNETS[name]))
        got = shapes(UNet2DConditionModel.from_config(REAL_UNETS[name]))
    assert got == expected


# -- VAE ---------------------------------------------------------------------------------------------------------

VAE = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 32,
}


@pytest.fixture
def vae_pair(tmp_path: Path):
    ref = reference(diffusers.AutoencoderKL, VAE, tmp_path)
    return ref, AutoencoderKL.from_pretrained(tmp_path)


def test_vae_encode_matches_diffusers(vae_pair):
    ref, ours = vae_pair
    images = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        expected, got = ref.encode(images).latent_dist, ours.encode(images).latent_dist
        assert got.mean.shape == (BATCH, 4, 16, 16)
        assert max_diff(expected.mode(), got.mode()) < TOL
        assert max_diff(expected.std, got.std) < TOL and max_diff(expected.logvar, got.logvar) < TOL
        sample_ref = expected.sample(generator=torch.Generator().manual_seed(7))
        sample_ours = got.sample(generator=torch.Generator().manual_seed(7))
        assert max_diff(sample_ref, sample_ours) < TOL
        assert max_diff(sample_ours, got.mode()) > 1e-3  # the sample is not the mode
        (posterior,) = ours.encode(images, return_dict=False)
        assert max_diff(posterior.parameters, got.parameters) == 0


def test_vae_decode_and_forward_match_diffusers(vae_pair):
    ref, ours = vae_pair
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(BATCH, 4, 16, 16, generator=g)
    images = torch.rand(BATCH, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = ours.decode(latents).sample
        assert decoded.shape == (BATCH, 3, 32, 32)
        assert max_diff(ref.decode(latents).sample, decoded) < TOL
        for posterior in (False, True):
            expected = ref(images, sample_posterior=posterior, generator=torch.Generator().manual_seed(8)).sample
            got = ours(images, sample_posterior=posterior, generator=torch.Generator().manual_seed(8)).sample
            assert max_diff(expected, got) < TOL
        ours.enable_slicing()
        assert max_diff(ours.decode(latents).sample, decoded) < 1e-5  # one image at a time, same result


def test_vae_round_trip_through_diffusers(vae_pair, tmp_path: Path):
    _, ours = vae_pair
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert max_diff(back.decode(latents).sample, ours.decode(latents).sample) == 0
    assert back.config.scaling_factor == ours.config.scaling_factor == 0.18215


@pytest.mark.parametrize(
    "config",
    [
        {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
        {"block_out_channels": [128, 256, 512], "layers_per_block": 2, "scaling_factor": 0.08333,
         "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3},
    ],
    ids=["sd-vae", "x4-upscaler-vae"],
)  # fmt: skip
def test_real_vae_configs_have_diffusers_parameter_names(config: dict):
    with torch.device("meta"):
        assert shapes(AutoencoderKL.from_config(config)) == shapes(diffusers.AutoencoderKL(**config))


def test_vae_unsupported_block_type_is_refused():
    config = {**VAE, "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}
    with pytest.raises(ValueError, match=r"down_block_types\[1\]='AttnDownEncoderBlock2D'.*DownEncoderBlock2D"):
        AutoencoderKL.from_config(config)
