"""Request and response bodies of the `/sdapi/v1` API, with AUTOMATIC1111's field names and defaults.

Fields A1111 has and stablepipe cannot honour are accepted at their default (and the values that leave the
picture unchanged); any other value gets a 422 naming the field (see `a1111.py`). Fields A1111 does not have
are refused (422), never ignored: a field from another fork may change the picture.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1
Float = dict(allow_inf_nan=False)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationRequest(Strict):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = Field(None, description="refused unless empty: no prompt styles are stored here")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed (returned in `info`)")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed_strength: float = Field(0, ge=0, le=1, description="variation seeds are not supported: 0 only", **Float)
    seed_resize_from_h: int = Field(-1, ge=-1)
    seed_resize_from_w: int = Field(-1, ge=-1)
    seed_enable_extras: bool = True
    sampler_name: str | None = Field(None, description="A1111 name, e.g. 'Euler a', 'DPM++ 2M'; see /samplers")
    scheduler: str | None = Field(None, description="schedule type, e.g. 'Automatic', 'Karras'; see /schedulers")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=100, **Float)
    width: int = Field(512, ge=8, multiple_of=8)
    height: int = Field(512, ge=8, multiple_of=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, ge=0, le=1, **Float)
    denoising_strength: float | None = Field(0.75, ge=0, le=1, **Float)
    s_min_uncond: float | None = Field(None, **Float)
    s_churn: float | None = Field(None, **Float)
    s_tmax: float | None = Field(None)
    s_tmin: float | None = Field(None, **Float)
    s_noise: float | None = Field(None, **Float)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, **Float)
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    sampler_index: str = Field("Euler", description="the sampler when `sampler_name` is not given")
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = Field(False, description="save under the server's --out folder (generated names)")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = Field(False, description="hires fix: upscale (Lanczos or Nearest), then img2img at "
                                               "denoising_strength")
    firstphase_width: int = Field(0, ge=0)
    firstphase_height: int = Field(0, ge=0)
    hr_scale: float = Field(2.0, gt=0, le=8, **Float)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] | None = Field(None, description="base64 images (PNG, JPEG ...), one per batch image "
                                                            "or one for all")
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill")
    image_cfg_scale: float | None = Field(None, **Float)
    mask: str | None = Field(None, description="base64 mask: white is repainted")
    mask_blur_x: int = Field(4, ge=0, le=256)
    mask_blur_y: int = Field(4, ge=0, le=256)
    mask_blur: int | None = Field(None, ge=0, le=256)
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original (2 latent noise and 3 latent "
                                                            "nothing are not supported)")
    inpaint_full_res: bool = Field(True, description="inpaint the masked area only, cropped and scaled up")
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = Field(None, **Float)
    latent_mask: str | None = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="PNG images in base64, their infotext in `parameters`")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seed, all_seeds, all_prompts, infotexts, width, height, ...")


class ExtrasSingleImageRequest(Strict):
    resize_mode: int = Field(0, ge=0, le=1, description="0 upscale by upscaling_resize, 1 to w x h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, **Float)
    codeformer_visibility: float = Field(0, ge=0, le=1, **Float)
    codeformer_weight: float = Field(0, ge=0, le=1, **Float)
    upscaling_resize: float = Field(2, gt=0, le=8, **Float)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", description="see /upscalers: the x4 upscaler, Lanczos, Nearest or None")
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, **Float)
    upscale_first: bool = False
    image: str = Field("", description="base64 image")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class PNGInfoRequest(Strict):
    image: str = Field(description="base64 PNG")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class Options(Strict):
    """The options stablepipe has (A1111 has hundreds; any other is refused with a 422 naming it)."""

    sd_model_checkpoint: str | None = Field(None, description="one of /sd-models (no loading: only those loaded)")
    CLIP_stop_at_last_layers: int | None = Field(None, ge=1, le=12)
    eta_ddim: float | None = Field(None, ge=0, le=1, **Float)
    eta_ancestral: float | None = Field(None, ge=1, le=1, **Float)
    samples_format: str | None = Field(None, pattern="^png$")
    sd_checkpoint_hash: str | None = None
