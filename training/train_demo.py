"""Train stablepipe's demo model (src/stablepipe/demo_model) on procedurally generated shapes.

    python training/train_demo.py --out src/stablepipe/demo_model

Three stages, all seeded (torch.manual_seed, numpy default_rng), on CPU:
1. a VAE (AutoencoderKL, downscale factor 2, 4 latent channels) learns to reconstruct the pictures, and pictures of
   several shapes anywhere (so that its decoder stays local: see shapes_data.make_vae_pictures);
2. the pictures are encoded once into latents, scaled to unit variance (the VAE's `scaling_factor`);
3. a UNet2DConditionModel and a CLIP text encoder learn, jointly and from scratch, to predict v (Salimans & Ho
   2022) on SD's scaled-linear betas rescaled to zero terminal SNR (Lin et al. 2024), with 10 % of captions
   dropped for classifier-free guidance.
The weights are saved in diffusers' layout in float16, with a DDIM scheduler config (trailing timesteps, zero
terminal SNR, v-prediction) that every pipeline reads.

Why zero terminal SNR: with SD's own schedule the last training step keeps sqrt(0.0047) = 7 % of the picture, and a
shape filling a quadrant of a 16 x 16 latent is still visible through that noise, so a model learns to take the
shape's place from the noise instead of from the caption; sampling starts from pure noise, so the position comes
out at random (measured: position right in 19-31 % of samples after 4000 steps with epsilon prediction).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import shapes_data  # noqa: E402

MAX_TOKENS = 24  # the tokenizer's model_max_length: a caption is 13 tokens with its start and end
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    sample_size=shapes_data.SIZE,
)
# Four levels, 16 x 16 down to 2 x 2: at 2 x 2 each cell is one quadrant and tells where it is from the zero
# padding around it, so cross-attention there can place the shape where the caption says (with three levels,
# down to 4 x 4, position stayed at chance after 4000 steps).
UNET_CONFIG = dict(
    sample_size=shapes_data.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 96, 128), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=64, attention_head_dim=4,
    norm_num_groups=8,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                   max_position_embeddings=MAX_TOKENS, projection_dim=64)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
    clip_sample=False,  # DDIM's default clips x0 to [-1, 1]: right for pixels, ruinous for unit-variance latents
    steps_offset=1,  # unused with trailing timesteps; diffusers warns at load time about any other value
)


def caption_words() -> list[str]:
    words = {"a", "on", "background", *shapes_data.SHAPES, *shapes_data.SIZES, *shapes_data.COLOURS}
    words |= set(shapes_data.BACKGROUNDS) | {w for p in shapes_data.POSITIONS for w in p.split()}
    return sorted(words)


def write_tokenizer(folder: Path):
    """A CLIP BPE tokenizer: the byte-level alphabet plus merges that make each caption word one token."""
    from transformers import CLIPTokenizer

    from stablepipe.builtin import byte_level_alphabet

    alphabet = byte_level_alphabet()
    tokens, merges = alphabet + [c + "</w>" for c in alphabet], []
    for word in caption_words():
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "r e", "re d</w>"
            merge = f"{parts[0]} {parts[1]}"
            parts = [parts[0] + parts[1]] + parts[2:]
            if merge not in merges:
                merges.append(merge)
                tokens.append(parts[0])
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_models(tokenizer, *, cross_attention_everywhere: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablepipe.models.unet import UNet2DConditionModel
    from stablepipe.models.vae import AutoencoderKL

    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **TEXT_CONFIG)
    unet_config = dict(UNET_CONFIG)
    if cross_attention_everywhere:
        unet_config.update(down_block_types=("CrossAttnDownBlock2D",) * 4, up_block_types=("CrossAttnUpBlock2D",) * 4)
    return AutoencoderKL(**VAE_CONFIG), UNet2DConditionModel(**unet_config), CLIPTextModel(text_config)


# ---- stage 1: the VAE ---------------------------------------------------------------------------------------


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]


def train_vae(vae, images: np.ndarray, *, steps: int, batch: int, lr: float, seed: int, log):
    """Reconstruction (MSE) plus a tiny KL term, as in the LDM paper's KL-regularised autoencoder (Rombach 2022)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        x = to_unit(images[torch.randint(len(images), (batch,), generator=gen).numpy()])  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)  # (B, 4, h, w)
        recon = vae.decode(z).sample  # (B, 3, H, W)
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
        loss = F.mse_loss(recon, x) + 1e-4 * kl
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} mse {F.mse_loss(recon, x).item():.5f} kl {kl.item():.3f}")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: np.ndarray, *, batch: int = 256) -> torch.Tensor:
    """The posterior means of all pictures, (N, 4, h, w), unscaled."""
    chunks = [to_unit(images[i : i + batch]) for i in range(0, len(images), batch)]
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in chunks])


# ---- stage 3: the UNet and the text encoder --------------------------------------------------------------------


def alphas_cumprod() -> torch.Tensor:
    """The scheduler's own ᾱ: SD's scaled-linear betas rescaled to zero terminal SNR (ᾱ_T = 0)."""
    from stablepipe.schedulers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def diffusion_loss(unet, text_encoder, latents, ids, acp, gen, high_noise_share: float = 0.0) -> torch.Tensor:
    """v-prediction MSE (Salimans & Ho 2022, v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x₀), i.e. x₀ errors weighted by SNR + 1,
    capped at 6 as min-SNR-5 does (Hang 2023) so that nearly clean steps do not dominate; weight 1 at pure noise.
    `high_noise_share` of the timesteps are drawn from the noisiest quarter, where only the caption can say where
    the shape goes (the layout is decided there)."""
    t = torch.randint(len(acp), (latents.shape[0],), generator=gen)  # (B,)
    if high_noise_share > 0:
        noisy_t = torch.randint(3 * len(acp) // 4, len(acp), (latents.shape[0],), generator=gen)
        t = torch.where(torch.rand(latents.shape[0], generator=gen) < high_noise_share, noisy_t, t)
    noise = torch.randn(latents.shape, generator=gen)  # (B, 4, h, w)
    a = acp[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # (B, 4, h, w), Ho 2020 Eq. 4
    target = a.sqrt() * noise - (1 - a).sqrt() * latents
    pred = unet(noisy, t, text_encoder(ids)[0]).sample  # (B, 4, h, w)
    snr_plus_one = 1 / (1 - acp[t])
    weight = snr_plus_one.clamp(max=6.0) / snr_plus_one  # (B,)
    return (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()


def train_unet(
    unet, text_encoder, latents, ids, empty_ids, *, steps, batch, lr, seed, out, save_every, log, save, train_text,
    high_noise_share=0.0,
):
    gen = torch.Generator().manual_seed(seed)
    text_encoder.requires_grad_(train_text)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    acp, start, running = alphas_cumprod(), time.time(), None
    for step in range(1, steps + 1):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < 0.1  # classifier-free guidance (Ho & Salimans 2022)
        batch_ids = torch.where(drop[:, None], empty_ids[None], ids[idx])  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 200)  # linear warm-up, then constant
        loss = diffusion_loss(unet, text_encoder, latents[idx], batch_ids, acp, gen, high_noise_share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0:
            log(f"unet step {step} loss {running:.4f} {(time.time() - start) / step:.2f} s/step")
        if step % save_every == 0 or step == steps:
            save(ema_unet, ema_text, out / f"step{step:06d}")
    return ema_unet, ema_text


# ---- saving ----------------------------------------------------------------------------------------------------


def save_pipeline(vae, unet, text_encoder, tokenizer, folder: Path) -> Path:
    """The diffusers layout, all weights in float16 (the modules are loaded back in float32 by default)."""
    from safetensors.torch import load_file, save_file

    from stablepipe.pipelines.stable_diffusion import StableDiffusionPipeline
    from stablepipe.schedulers import DDIMScheduler

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    for path in folder.glob("*/*.safetensors"):
        save_file({k: v.half().contiguous() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder for the final model")
    parser.add_argument("--work", type=Path, default=Path("training/runs/demo"), help="checkpoints and logs")
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--vae-steps", type=int, default=2400)
    parser.add_argument("--steps", type=int, default=7500, help="UNet + text encoder steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze-text", action="store_true", help="keep the text encoder at its random init")
    parser.add_argument("--high-noise-share", type=float, default=0.5,
                        help="the share of timesteps drawn from the noisiest quarter")
    parser.add_argument("--cross-attention-everywhere", action="store_true",
                        help="cross-attention at the 16 x 16 level too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / "log.txt").open("a")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        log_file.flush()

    images, captions = shapes_data.make_dataset(args.images, seed=args.seed)
    log(f"{len(images)} pictures")
    tokenizer = write_tokenizer(args.work / "tokenizer")
    torch.manual_seed(args.seed)
    vae, unet, text_encoder = build_models(tokenizer, cross_attention_everywhere=args.cross_attention_everywhere)
    half = len(images) // 2  # the VAE sees captioned scenes and pictures of several shapes, half and half
    several = shapes_data.make_vae_pictures(len(images) - half, seed=args.seed + 1)
    vae_pictures = np.concatenate([images[:half], several])
    vae = train_vae(vae, vae_pictures, steps=args.vae_steps, batch=16, lr=3e-3, seed=args.seed, log=log)
    latents = encode_all(vae, images)  # (N, 4, h, w)
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    latents = latents * vae.config.scaling_factor
    log(f"scaling factor {vae.config.scaling_factor}, latent mean {latents.mean().item():.3f}")
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids  # (N, T)
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]  # (T,)

    def save(ema_unet, ema_text, folder):
        save_pipeline(vae, ema_unet, ema_text, tokenizer, folder)
        log(f"saved {folder}")

    ema_unet, ema_text = train_unet(
        unet, text_encoder, latents, ids, empty, steps=args.steps, batch=args.batch, lr=args.lr,
        seed=args.seed, out=args.work, save_every=args.save_every, log=log, save=save, train_text=not args.freeze_text,
        high_noise_share=args.high_noise_share,
    )
    save(ema_unet, ema_text, args.out)


if __name__ == "__main__":
    main()
