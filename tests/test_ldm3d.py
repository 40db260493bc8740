"""LDM3D: RGB + depth parity with diffusers, panoramas that wrap around, the RGB-D upscaler, the CLI."""

from __future__ import annotations

import json
import warnings

import fixtures_ldm3d
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import max_diff
from fixtures_ldm3d import write_ldm3d_folder

import stablepipe
from stablepipe.pipelines.ldm3d import horizontal_wrap, rgblike_to_depth

ldm3d_folder, ldm3d_safety_folder, ldm3d_sr_folder = (  # session fixtures used here
    fixtures_ldm3d.ldm3d_folder, fixtures_ldm3d.ldm3d_safety_folder, fixtures_ldm3d.ldm3d_sr_folder
)

TOLERANCE = 2e-3


def load_both(folder, scheduler: str | None = None):
    import diffusers

    ours = stablepipe.StableDiffusionLDM3DPipeline.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionLDM3DPipeline.from_pretrained(folder)
    if scheduler:
        ours.scheduler = getattr(stablepipe, scheduler).from_config(ours.scheduler.config)
        theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def pipes(ldm3d_folder):
    return load_both(ldm3d_folder)


def run_both(ours, theirs, seed: int = 0, *, check_shapes: bool = True, **kwargs):
    kwargs = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np", **kwargs}
    a = ours(generator=torch.Generator().manual_seed(seed), **kwargs)
    b = theirs(generator=torch.Generator().manual_seed(seed), **kwargs)
    assert not check_shapes or (a.rgb.shape == b.rgb.shape and a.depth.shape == b.depth.shape)
    return a, b


CASES = {
    "pndm-guided": dict(scheduler=None, call=dict(prompt="a red circle", guidance_scale=7.5)),
    "pndm-unguided": dict(scheduler=None, call=dict(prompt="a red circle", guidance_scale=1.0)),
    "default-guidance": dict(scheduler=None, call=dict(prompt="a room")),  # diffusers' LDM3D default, 5.0
    "ddim-eta": dict(scheduler="DDIMScheduler", call=dict(prompt="the sea", eta=0.5)),
    "euler-batch": dict(
        scheduler="EulerDiscreteScheduler",
        call=dict(prompt=["a red circle", "on the sea"], negative_prompt=["blue", "green"], num_images_per_prompt=2),
    ),
    "nonsquare": dict(scheduler="EulerAncestralDiscreteScheduler", call=dict(prompt="an owl", height=16, width=48)),
}


@pytest.mark.parametrize("case", CASES)
def test_rgb_and_depth_match_diffusers(ldm3d_folder, case):
    spec = CASES[case]
    ours, theirs = load_both(ldm3d_folder, spec["scheduler"])
    a, b = run_both(ours, theirs, **spec["call"])
    rgb_diff, depth_diff = max_diff(a.rgb, b.rgb), max_diff(a.depth, b.depth)
    assert rgb_diff < TOLERANCE and depth_diff < TOLERANCE, f"{case}: rgb {rgb_diff}, depth {depth_diff}"
    assert a.rgb.shape[-1] == 3 and a.depth.shape[-1] == 1
    assert a.rgb.std() > 0.01 and a.depth.std() > 0.01  # real pictures, not constants
    assert np.abs(a.rgb.mean(-1, keepdims=True) - a.depth).max() > 0.05  # depth is its own channel


def test_pil_outputs_are_8_bit_rgb_and_16_bit_depth(pipes):
    ours, theirs = pipes
    out = ours("a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(1))
    # diffusers' own PIL path fails on Pillow >= 11 for depth, so convert its arrays the way it means to
    ref = theirs("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(1))
    rgb, depth = np.asarray(out.rgb[0]), np.asarray(out.depth[0])
    assert out.rgb[0].mode == "RGB" and out.depth[0].mode == "I;16" and depth.dtype == np.uint16
    assert np.abs(rgb.astype(int) - (ref.rgb[0] * 255).round().astype(int)).max() <= 1
    assert np.abs(depth.astype(int) - (ref.depth[0, ..., 0] * 65535).astype(int)).max() <= 65535 * TOLERANCE
    assert depth.max() > 256  # uses the 16-bit range, not 8-bit values in a 16-bit image


def test_tuple_pt_and_latent_outputs(pipes):
    ours, _ = pipes
    kwargs = dict(prompt="a room", num_inference_steps=2, height=32, width=32)
    generator = torch.Generator().manual_seed(0)
    (rgb, depth), flags = ours(**kwargs, output_type="pt", return_dict=False, generator=generator)
    assert rgb.shape == (1, 3, 32, 32) and depth.shape == (1, 1, 32, 32) and flags is None
    assert 0 <= float(depth.min()) and float(depth.max()) <= 1
    latent = ours(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert latent.rgb.shape == (1, 4, 16, 16) and latent.depth is None
    assert latent[0] is latent.rgb  # diffusers' BaseOutput indexing


def test_safety_checker_blacks_out_rgb_and_depth_like_diffusers(ldm3d_safety_folder):
    ours, theirs = load_both(ldm3d_safety_folder)
    for pipe in (ours, theirs):
        with torch.no_grad():
            pipe.safety_checker.concept_embeds_weights.fill_(-2.0)  # every concept fires
    # diffusers makes depth PIL images for the checker's input too (only RGB is used), which fails on Pillow >= 11
    theirs.image_processor.numpy_to_depth = lambda images: []
    a, b = run_both(ours, theirs, prompt=["a red circle", "a room"])
    assert a.nsfw_content_detected == b.nsfw_content_detected == [True, True]
    assert a.rgb.max() == 0 and a.depth.max() == 0
    assert max_diff(a.rgb, b.rgb) == 0 and max_diff(a.depth, b.depth) == 0


def test_callback_on_step_end_sees_and_replaces_latents(pipes):
    ours, theirs = pipes
    seen = []

    def halve(pipe, i, t, tensors):
        seen.append(i)
        return {"latents": tensors["latents"] * 0.5}

    a, b = run_both(ours, theirs, prompt="a room", callback_on_step_end=halve)
    assert seen == [0, 1, 2, 3] * 2  # PNDM's 3 steps are 4 timesteps
    assert max_diff(a.rgb, b.rgb) < TOLERANCE and max_diff(a.depth, b.depth) < TOLERANCE


def test_original_six_channel_layout(tmp_path):
    """Intel/ldm3d decodes RGB + a 16-bit depth packed in 3 RGB-like channels. diffusers unpacks it from floats
    cast to int (0 or 1) and overflows uint8; its unpacking is replaced here by the intended one (high byte *
    256 + low byte), so the comparison checks everything else: channel order, scaling, batching."""
    import diffusers

    folder = write_ldm3d_folder(tmp_path / "ldm3d6", channels=6)
    ours = stablepipe.StableDiffusionLDM3DPipeline.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionLDM3DPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    unpack = lambda x: (x[..., 1:2] * 255).round() * 256 + (x[..., 2:3] * 255).round()  # noqa: E731
    theirs.image_processor.rgblike_to_depthmap = unpack
    a, b = run_both(ours, theirs, prompt=["a room", "a cat"], num_inference_steps=2, check_shapes=False)
    assert max_diff(a.rgb, b.rgb) < TOLERANCE
    assert a.depth.shape == (2, 32, 32, 1) and a.depth.std() > 0.01
    assert max_diff(a.depth * 65535, b.depth) <= 256 * 1.01  # at most one step of the high byte, on rounding


def test_rgblike_depth_unpacks_high_and_low_bytes():
    values = torch.tensor([0, 1, 255, 256, 12345, 65535]).float()
    high, low = values // 256, values % 256
    packed = torch.stack([torch.rand(6), high / 255, low / 255])[None, :, None, :]  # (1, 3, 1, 6)
    assert torch.allclose(rgblike_to_depth(packed)[0, 0, 0] * 65535, values)


# ---- panoramas --------------------------------------------------------------------------------------------


def test_circular_padding_joins_left_and_right_edges(pipes):
    """With wrap-around, rolling the starting noise by 2 latent columns rolls the picture by 4 pixels (the
    tiny VAE upsamples 2x): the pipeline has no left or right edge, and the seam of one picture (its last and
    first columns) comes out as two ordinary neighbouring columns of the other. Without it, it does not."""
    ours, _ = pipes
    latents = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="360 view of a room", num_inference_steps=3, height=16, width=48, output_type="pt")
    errors = {}
    for wrap in (True, False):
        a = ours(latents=latents, circular_padding=wrap, **kwargs)
        b = ours(latents=torch.roll(latents, 2, dims=-1), circular_padding=wrap, **kwargs)
        for name in ("rgb", "depth"):
            x, y = getattr(a, name), getattr(b, name)  # (1, C, 16, 48)
            errors[wrap, name] = max_diff(torch.roll(x, 4, dims=-1), y)
            if wrap:
                seam = torch.cat([x[..., -1:], x[..., :1]], dim=-1)  # last column, then first
                assert max_diff(seam, y[..., 3:5]) < 1e-4
    assert errors[True, "rgb"] < 1e-4 and errors[True, "depth"] < 1e-4
    assert errors[False, "rgb"] > 0.05 and errors[False, "depth"] > 0.05


def test_wrap_is_undone_after_the_call(pipes):
    ours, _ = pipes
    before = [(m.padding, len(m._forward_pre_hooks)) for m in ours.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    with pytest.raises(RuntimeError):
        with horizontal_wrap(ours.unet, ours.vae):
            assert ours.unet.conv_in.padding == (1, 0) and len(ours.unet.conv_in._forward_pre_hooks) == 1
            raise RuntimeError("fails inside")
    after = [(m.padding, len(m._forward_pre_hooks)) for m in ours.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert after == before and before[0] == ((1, 1), 0)


def test_wrapped_vae_encoder_is_circular_too(pipes):
    """The encoder's right-only padding downsample wraps as well (the upscaler encodes panoramas)."""
    vae = pipes[0].vae
    image = torch.rand(1, 4, 16, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with horizontal_wrap(vae), torch.no_grad():
        a = vae.encode(image).latent_dist.mean
        b = vae.encode(torch.roll(image, 4, dims=-1)).latent_dist.mean
    assert max_diff(torch.roll(a, 2, dims=-1), b) < 1e-4


# ---- components, loading, errors ---------------------------------------------------------------------------


def test_components_and_saving_round_trip_through_diffusers(pipes, tmp_path):
    import diffusers

    ours, theirs = pipes
    assert ours.image_encoder is None and set(ours.components) == set(theirs.components)
    shared = stablepipe.StableDiffusionLDM3DPipeline(**ours.components)
    assert shared.unet is ours.unet
    shared.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionLDM3DPipeline" and index["image_encoder"] == [None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = diffusers.StableDiffusionLDM3DPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    a, b = run_both(ours, reloaded, prompt="a room", num_inference_steps=2)
    assert max_diff(a.depth, b.depth) < TOLERANCE


def test_plain_sd_vae_is_refused_with_a_fix(sd1_folder):
    with pytest.raises(ValueError, match="ldm3d-4c") as err:
        stablepipe.StableDiffusionLDM3DPipeline.from_pretrained(sd1_folder)
    assert "decodes 3" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_type="jpeg"), "output_type"),
        (dict(height=30), "multiple of 8"),
        (dict(prompt=None), "prompt"),
        (dict(prompt_3="a third prompt"), "unknown arguments"),
    ],
)
def test_bad_input_is_refused_early(pipes, kwargs, match):
    ours, _ = pipes

    def unet_ran(*_):
        raise AssertionError("the UNet ran before the input was checked")

    hook = ours.unet.register_forward_pre_hook(unet_ran)
    try:
        with pytest.raises((ValueError, TypeError), match=match):
            ours(**{"prompt": "a room", "num_inference_steps": 2, "height": 32, "width": 32, **kwargs})
    finally:
        hook.remove()


# ---- the RGB-D upscaler (diffusers has it only as a community pipeline: no parity, behaviour tests) -----------


@pytest.fixture(scope="module")
def upscaler(ldm3d_sr_folder):
    pipe = stablepipe.StableDiffusionUpscaleLDM3DPipeline.from_pretrained(ldm3d_sr_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def low_res_pair(seed: int = 0, size: int = 16):
    """A random RGB image and a 16-bit depth map, as LDM3D writes them."""
    rng = np.random.default_rng(seed)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    depth = PIL.Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16))
    return rgb, depth


def upscale(pipe, rgb, depth, seed: int = 0, **kwargs):
    kwargs = {"prompt": "high resolution", "num_inference_steps": 3, "target_res": [32, 32], "output_type": "np",
              **kwargs}  # fmt: skip
    return pipe(rgb=rgb, depth=depth, generator=torch.Generator().manual_seed(seed), **kwargs)


class UNetSpy:
    """Records what the UNet is called with."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, _, args, kwargs):
        self.calls.append((args[0].clone(), kwargs.get("class_labels")))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def test_upscaler_shapes_ranges_and_16_bit_depth(upscaler):
    rgb, depth = low_res_pair()
    out = upscale(upscaler, rgb, depth, output_type="pil", target_res=[32, 48])
    assert out.rgb[0].size == (48, 32) and out.rgb[0].mode == "RGB"
    assert out.depth[0].size == (48, 32) and out.depth[0].mode == "I;16" and np.asarray(out.depth[0]).max() > 256
    arrays = upscale(upscaler, [rgb, rgb], [depth, depth], prompt=["a", "b"], num_images_per_prompt=2)
    assert arrays.rgb.shape == (4, 32, 32, 3) and arrays.depth.shape == (4, 32, 32, 1)
    for x in (arrays.rgb, arrays.depth):
        assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.01
    (rgb_t, depth_t), flags = upscale(upscaler, rgb, depth, output_type="pt", return_dict=False)
    assert rgb_t.shape == (1, 3, 32, 32) and depth_t.shape == (1, 1, 32, 32) and flags is None


def test_upscaler_is_deterministic_per_seed(upscaler):
    rgb, depth = low_res_pair()
    a, b, c = (upscale(upscaler, rgb, depth, seed=s) for s in (0, 0, 1))
    assert max_diff(a.rgb, b.rgb) == 0 and max_diff(a.depth, b.depth) == 0
    assert max_diff(a.rgb, c.rgb) > 0.01 and max_diff(a.depth, c.depth) > 0.01


def test_rgb_and_depth_each_condition_the_output(upscaler):
    rgb, depth = low_res_pair(0)
    other_rgb, other_depth = low_res_pair(1)
    base = upscale(upscaler, rgb, depth)
    for changed in (upscale(upscaler, other_rgb, depth), upscale(upscaler, rgb, other_depth)):
        assert max_diff(base.rgb, changed.rgb) > 0.01 and max_diff(base.depth, changed.depth) > 0.01


def test_vae_sees_rgb_and_depth_in_0_1_at_the_target_size(upscaler):
    """The reference pipeline's encoding: RGB / 255 and 16-bit depth / 65535, resized, as one 4-channel image."""
    rgb = PIL.Image.new("RGB", (16, 16), (255, 0, 51))
    depth = PIL.Image.fromarray(np.full((16, 16), 13107, dtype=np.uint16))  # 13107 / 65535 = 0.2
    seen = []
    handle = upscaler.vae.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        upscale(upscaler, rgb, depth, num_inference_steps=1)
    finally:
        handle.remove()
    expected = torch.tensor([1.0, 0.0, 0.2, 0.2])[None, :, None, None].expand(1, 4, 32, 32)
    assert seen[0].shape == (1, 4, 32, 32) and max_diff(seen[0], expected) < 1e-6


def test_unet_gets_image_latents_in_prompt_order_and_noise_level_labels(upscaler):
    rgb_a, depth_a = low_res_pair(0)
    rgb_b, depth_b = low_res_pair(1)
    with UNetSpy(upscaler.unet) as spy:
        upscale(upscaler, [rgb_a, rgb_b], [depth_a, depth_b], prompt=["a", "b"], num_images_per_prompt=2,
                noise_level=37, num_inference_steps=1)  # fmt: skip
    sample, labels = spy.calls[0]
    assert sample.shape == (8, 8, 16, 16)  # (uncond, cond) x 2 prompts x 2 images, 4 latent + 4 image channels
    assert labels.tolist() == [37] * 8
    image = sample[:, 4:]  # the conditioning latents: a, a, b, b for each half
    same = [[bool(torch.equal(image[i], image[j])) for j in range(8)] for i in range(8)]
    assert same[0][:4] == [True, True, False, False] and same[0][4:] == [True, True, False, False]
    assert same[2][:4] == [False, False, True, True]
    with UNetSpy(upscaler.unet) as spy:
        upscale(upscaler, rgb_a, depth_a, guidance_scale=1.0, num_inference_steps=1)
    assert spy.calls[0][0].shape[0] == 1  # no guidance: one UNet batch


def test_noise_level_conditions_the_output(upscaler):
    rgb, depth = low_res_pair()
    low, high = upscale(upscaler, rgb, depth, noise_level=0), upscale(upscaler, rgb, depth, noise_level=300)
    assert max_diff(low.rgb, high.rgb) > 0.01


def test_input_formats_agree(upscaler):
    """PIL images, uint8 / uint16 arrays and float tensors of the same pixels give the same result; an 8-bit
    depth map is the 16-bit one at 1/257 the resolution."""
    rgb, depth = low_res_pair()
    rgb_array, depth_array = np.asarray(rgb), np.asarray(depth)
    as_pil = upscale(upscaler, rgb, depth)
    as_arrays = upscale(upscaler, rgb_array, depth_array)
    as_tensors = upscale(upscaler, torch.from_numpy(rgb_array / 255.0).permute(2, 0, 1).float(),
                         torch.from_numpy(depth_array / 65535.0).float()[None])  # fmt: skip
    for other in (as_arrays, as_tensors):
        assert max_diff(as_pil.rgb, other.rgb) < 1e-4 and max_diff(as_pil.depth, other.depth) < 1e-4
    coarse = PIL.Image.fromarray((depth_array // 257).astype(np.uint8), mode="L")
    exact = PIL.Image.fromarray((depth_array // 257 * 257).astype(np.uint16))
    assert max_diff(upscale(upscaler, rgb, coarse).depth, upscale(upscaler, rgb, exact).depth) < 1e-4


def test_upscaler_circular_padding_is_used_and_undone(upscaler):
    rgb, depth = low_res_pair()
    before = upscaler.unet.conv_in.padding
    plain, wrapped = upscale(upscaler, rgb, depth), upscale(upscaler, rgb, depth, circular_padding=True)
    assert max_diff(plain.rgb, wrapped.rgb) > 1e-3
    assert upscaler.unet.conv_in.padding == before and not upscaler.unet.conv_in._forward_pre_hooks


def test_upscaler_round_trips_its_config(upscaler, tmp_path):
    upscaler.save_pretrained(tmp_path / "sr")
    index = json.loads((tmp_path / "sr" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscaleLDM3DPipeline" and index["max_noise_level"] == 350
    assert index["low_res_scheduler"] == ["diffusers", "DDPMScheduler"]
    again = stablepipe.StableDiffusionUpscaleLDM3DPipeline.from_pretrained(tmp_path / "sr", max_noise_level=100)
    assert again.max_noise_level == 100 and type(again.low_res_scheduler).__name__ == "DDPMScheduler"


LOW_RES = low_res_pair()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=None), "depth"),
        (dict(noise_level=351), "max_noise_level"),
        (dict(target_res=[31, 32]), "multiple of 2"),  # the tiny VAE downsamples 2x
        (dict(target_res=512), r"\[height, width\]"),
        (dict(prompt=["a", "b", "c"], rgb=[LOW_RES[0]] * 2, depth=[LOW_RES[1]] * 2), "2 images for 3 prompts"),
        (dict(rgb=[LOW_RES[0]] * 2), "1 depth maps"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(callback_steps=0), "callback_steps"),
    ],
)
def test_upscaler_refuses_bad_input_before_running(upscaler, kwargs, match):
    hook = upscaler.unet.register_forward_pre_hook(lambda *_: pytest.fail("the UNet ran before the check"))
    try:
        with pytest.raises((ValueError, TypeError), match=match):
            upscaler(**{"prompt": "hq", "rgb": LOW_RES[0], "depth": LOW_RES[1], "num_inference_steps": 2,
                        "target_res": [32, 32], **kwargs})  # fmt: skip
    finally:
        hook.remove()


def test_upscaler_refuses_text_to_image_components(pipes):
    ours, _ = pipes
    parts = {k: v for k, v in ours.components.items() if k not in ("image_encoder",)}
    with pytest.raises(ValueError, match="input channels"):
        stablepipe.StableDiffusionUpscaleLDM3DPipeline(low_res_scheduler=ours.scheduler, **parts)


# ---- the command line ------------------------------------------------------------------------------------------


def test_cli_ldm3d_pano_then_upscale_ldm3d(tmp_path, monkeypatch, capsys):
    """`stablepipe ldm3d --pano` writes a 2:1 RGB PNG and a 16-bit depth PNG; `stablepipe upscale --ldm3d RGB
    DEPTH` doubles both (built-in tiny models)."""
    from stablepipe.cli import main

    monkeypatch.setenv("STABLEPIPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pano.png"
    assert main(["ldm3d", "a beach", "--pano", "--seed", "5", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    rgb, depth = PIL.Image.open(out), PIL.Image.open(tmp_path / "pano-depth.png")
    assert rgb.mode == "RGB" and depth.mode == "I;16" and rgb.size == depth.size == (256, 128)
    settings = json.loads(depth.text["stablepipe"])
    assert settings["pano"] is True and settings["seed"] == 5 and settings["depth_of"] == "pano.png"
    assert f"wrote {out} (seed 5)" in capsys.readouterr().out

    up = tmp_path / "up.png"
    args = ["upscale", "--ldm3d", str(out), str(tmp_path / "pano-depth.png"), "--pano", "--steps", "2", "--seed", "1"]
    assert main([*args, "--out", str(up), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["kind"] for f in report["files"]] == ["rgb", "depth"]
    big_rgb, big_depth = PIL.Image.open(up), PIL.Image.open(tmp_path / "up-depth.png")
    assert big_rgb.size == big_depth.size == (512, 256) and big_depth.mode == "I;16"
    assert np.asarray(big_depth).std() > 0


def test_cli_upscale_ldm3d_errors(tmp_path, monkeypatch, capsys):
    from stablepipe.cli import main

    image = tmp_path / "a.png"
    PIL.Image.new("RGB", (16, 16)).save(image)
    assert main(["upscale", "--ldm3d", str(image)]) == 2
    assert "needs the depth map" in capsys.readouterr().err
    assert main(["upscale", "--x4", str(image), str(image)]) == 2
    assert "for --ldm3d only" in capsys.readouterr().err
    assert main(["upscale", "--ldm3d", str(image), str(image), "--tile", "64"]) == 2
    assert "--ldm3d takes no --tile" in capsys.readouterr().err
