"""The diffusers API points user code meets (issue #21): outputs as ordered dicts, the optional image_encoder
component, cross_attention_kwargs' LoRA scale, scheduler config round trips, attention processors, attention
masks, sharded saving, gradient checkpointing."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from conftest import SD1_UNET, VAE, max_diff
from test_lora import image, load_both, peft_lora

import stablepipe
from stablepipe import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from stablepipe.loading.checkpoint import write_checkpoint
from stablepipe.models.attention import AttnProcessor, AttnProcessor2_0
from stablepipe.schedulers import SchedulerOutput

TOLERANCE = 2e-3


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD1_UNET).eval()


def unet_inputs(seed: int = 0, tokens: int = 7) -> tuple[torch.Tensor, int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), 10, torch.randn(2, tokens, 32, generator=g)


# ---- outputs ---------------------------------------------------------------------------------------------------


def test_outputs_are_ordered_dicts_of_their_set_fields():
    sample, pred = torch.ones(1, 4), torch.zeros(1, 4)
    out = SchedulerOutput(prev_sample=sample)
    assert list(out.keys()) == ["prev_sample"] and out["prev_sample"] is sample and out[0] is sample
    assert out.to_tuple() == (sample,) and list(out.values()) == [sample]
    out.pred_original_sample = pred  # setting a field adds its key, as in diffusers
    assert list(out) == ["prev_sample", "pred_original_sample"] and out[1] is pred
    out["prev_sample"] = pred
    assert out.prev_sample is pred
    assert list(pickle.loads(pickle.dumps(out)).keys()) == list(copy.deepcopy(out).keys()) == list(out.keys())
    with pytest.raises(TypeError, match="set it to a new value"):
        del out["prev_sample"]
    unet_out = tiny_unet()(*unet_inputs())
    assert unet_out["sample"] is unet_out.sample and unet_out.to_tuple()[0].shape == (2, 4, 16, 16)


def test_vae_outputs(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    with torch.no_grad():
        latent = vae.encode(torch.randn(1, 3, 32, 32))
        decoded = vae.decode(latent["latent_dist"].mode())
    assert list(latent.keys()) == ["latent_dist"] and list(decoded.keys()) == ["sample"]  # commit_loss is None
    assert decoded[0].shape == (1, 3, 32, 32)


# ---- pipelines: image_encoder, cross_attention_kwargs, IP-Adapter inputs --------------------------------------


def test_image_encoder_component_and_lora_scale(sd1_folder, tmp_path):
    ours, theirs = load_both(sd1_folder)
    assert "image_encoder" in ours.components and ours.image_encoder is None
    rebuilt = stablepipe.StableDiffusionImg2ImgPipeline(**{**ours.components, "image_encoder": None})
    assert rebuilt.unet is ours.unet
    path = write_checkpoint(peft_lora(ours), tmp_path / "lora.safetensors")
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(path), adapter_name="style")
    full, half = image(ours), image(ours, cross_attention_kwargs={"scale": 0.5})
    assert max_diff(half, image(theirs, cross_attention_kwargs={"scale": 0.5})) < TOLERANCE
    assert max_diff(full, half) > 0.01  # the scale really reaches the adapters, and is undone after the call
    assert max_diff(image(ours), full) == 0
    with pytest.raises(ValueError, match="call pipe.load_ip_adapter"):  # IP-Adapter inputs need an adapter
        ours("a cat", ip_adapter_image=torch.zeros(1, 3, 32, 32), num_inference_steps=1)


def test_torch_dtype_by_component(sd1_folder):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(
        sd1_folder, torch_dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert (pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (torch.bfloat16,) + (torch.float16,) * 2
    assert stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, torch_dtype={"vae": "float16"}).unet.dtype \
        == torch.float32  # components the dict does not name, without "default", load as stored


# ---- scheduler configs -----------------------------------------------------------------------------------------


def test_scheduler_config_round_trip(tmp_path):
    ddim = DDIMScheduler(beta_start=0.0001, beta_end=0.02)
    assert "clip_sample" in ddim.config["_use_default_values"] and "beta_start" not in ddim.config._use_default_values
    ddim.save_pretrained(tmp_path)
    assert "_use_default_values" not in json.loads((tmp_path / "scheduler_config.json").read_text())
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    expected = {k: v for k, v in ddim.config.items() if k != "_use_default_values"}
    assert dict(loaded.config) == expected
    # keys left at their defaults take the new class's defaults: DPM-Solver's own solver_type, not a carried one
    dpm = DPMSolverMultistepScheduler.from_config({**ddim.config, "solver_type": "heun",
                                                   "_use_default_values": ["solver_type"]})
    assert dpm.config.solver_type == "midpoint" and dpm.config.beta_end == 0.02
    with pytest.warns(FutureWarning, match="config"):
        assert ddim.beta_end == 0.02
    with pytest.raises(AttributeError, match="'DDIMScheduler' object has no attribute 'nope'"):
        _ = ddim.nope
    assert DDIMScheduler._deprecated_kwargs == ()


# ---- models: attention processors, masks, saving, checkpointing -----------------------------------------------


def test_attention_processors_and_encoder_attention_mask():
    unet = tiny_unet()
    x, t, context = unet_inputs()
    names = list(unet.attn_processors)
    assert len(names) == 12 and names[0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    keep = torch.ones(2, 7)
    keep[:, 5:] = 0  # the last two tokens masked out: the same as leaving them out
    with torch.no_grad():
        plain = unet(x, t, context).sample
        masked = unet(x, t, context, encoder_attention_mask=keep).sample
        truncated = unet(x, t, context[:, :5]).sample
        unet.set_default_attn_processor()
        classic = unet(x, t, context, encoder_attention_mask=keep).sample
    assert max_diff(masked, truncated) < 1e-5 and max_diff(masked, plain) > 1e-3
    assert max_diff(classic, masked) < 1e-5
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match=r"number of processors \(1\) does not match the 12 attention layers"):
        unet.set_attn_processor({names[0]: AttnProcessor()})


def test_custom_processor_receives_cross_attention_kwargs():
    class Recorder(AttnProcessor2_0):
        def __init__(self):
            self.seen = []

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            self.seen.append(kw)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    unet, recorder = tiny_unet(), Recorder()
    unet.set_attn_processor({name: recorder if "attn2" in name else AttnProcessor2_0()
                             for name in unet.attn_processors})
    with torch.no_grad():
        unet(*unet_inputs(), cross_attention_kwargs={"scale": 0.5, "tag": 3})
    assert recorder.seen == [{"tag": 3}] * 6  # the LoRA scale is the pipeline's, the rest goes to processors


def test_sharded_save_and_fp32_modules(tmp_path, monkeypatch):
    unet = tiny_unet()
    index = unet.save_pretrained(tmp_path, max_shard_size="300KB")
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert index.name == "diffusion_pytorch_model.safetensors.index.json" and len(shards) > 2
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert max_diff(loaded(*unet_inputs()).sample, unet(*unet_inputs()).sample) == 0
    monkeypatch.setattr(UNet2DConditionModel, "_keep_in_fp32_modules", ["conv_in"])
    half = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert half.conv_in.weight.dtype == torch.float32 and half.conv_out.weight.dtype == torch.float16


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = tiny_unet().train()
    x, t, context = unet_inputs()
    grads = []
    for enabled in (False, True):
        unet.zero_grad()
        if enabled:
            unet.enable_gradient_checkpointing()
        unet(x, t, context).sample.square().mean().backward()
        grads.append(unet.conv_in.weight.grad.clone())
    assert unet.is_gradient_checkpointing
    assert {type(m).__name__ for m in unet.modules() if getattr(m, "gradient_checkpointing", False)} == {
        "DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D",
        "Transformer2DModel"}
    assert max_diff(grads[0], grads[1]) < 1e-6
    unet.disable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unet.conv_in.weight is unet.get_parameter("conv_in.weight")  # module attributes never warn


def test_freeu_matches_diffusers(tmp_path):
    import diffusers

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**SD1_UNET).eval()
    theirs.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    x, t, context = unet_inputs()
    with torch.no_grad():
        plain = ours(x, t, context).sample
        for unet in (ours, theirs):
            unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        freeu = ours(x, t, context).sample
        assert max_diff(freeu, theirs(x, t, context).sample) < 1e-5 and max_diff(freeu, plain) > 1e-3
        ours.disable_freeu()
        assert max_diff(ours(x, t, context).sample, plain) == 0
