"""The pipeline classes by their diffusers names, each with the module that defines it.

One table, read by the root package's lazy public names and by `pipeline_class` (model_index.json's
`_class_name` -> our class). It imports nothing, so reading it loads no pipeline.
"""

from __future__ import annotations

PIPELINE_MODULES: dict[str, str] = {
    "StableDiffusionPipeline": "stablepipe.pipelines.stable_diffusion",
    "StableDiffusionImg2ImgPipeline": "stablepipe.pipelines.img2img",
    "StableDiffusionInpaintPipeline": "stablepipe.pipelines.inpaint",
    "StableDiffusionDepth2ImgPipeline": "stablepipe.pipelines.depth2img",
    "StableDiffusionImageVariationPipeline": "stablepipe.pipelines.variation",
    "StableDiffusionPipelineSafe": "stablepipe.pipelines.safe",
    "StableDiffusionUpscalePipeline": "stablepipe.pipelines.upscale",
    "StableDiffusionLatentUpscalePipeline": "stablepipe.pipelines.latent_upscale",
    "StableDiffusionXLPipeline": "stablepipe.pipelines.sdxl",
    "StableDiffusionXLImg2ImgPipeline": "stablepipe.pipelines.sdxl",
    "StableDiffusionXLInpaintPipeline": "stablepipe.pipelines.sdxl",
    "StableDiffusionLDM3DPipeline": "stablepipe.pipelines.ldm3d",
    "StableDiffusionUpscaleLDM3DPipeline": "stablepipe.pipelines.ldm3d",
}
