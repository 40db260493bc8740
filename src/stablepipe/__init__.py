"""stablepipe: the Stable Diffusion pipeline family in PyTorch, drop-in compatible with diffusers."""

from __future__ import annotations

import importlib
from typing import Any

from stablepipe.pipelines.registry import PIPELINE_MODULES
from stablepipe.version import __version__ as __version__

# Public name -> module that defines it. Imported on first use, so `import stablepipe` stays cheap.
_EXPORTS = {
    "UNet2DConditionModel": "stablepipe.models.unet",
    "AutoencoderKL": "stablepipe.models.vae",
    "StableDiffusionSafetyChecker": "stablepipe.models.safety",
    "ModelMixin": "stablepipe.models.base",
    "ConfigMixin": "stablepipe.configuration",
    "register_to_config": "stablepipe.configuration",
    "BaseOutput": "stablepipe.outputs",
    "SchedulerMixin": "stablepipe.schedulers",
    "SchedulerOutput": "stablepipe.schedulers",
    "AttnProcessor": "stablepipe.models.attention",
    "AttnProcessor2_0": "stablepipe.models.attention",
    "IPAdapterAttnProcessor": "stablepipe.models.attention",
    "IPAdapterAttnProcessor2_0": "stablepipe.models.attention",
    "ImageProjection": "stablepipe.models.embeddings",
    "IPAdapterPlusImageProjection": "stablepipe.models.embeddings",
    "IPAdapterFaceIDImageProjection": "stablepipe.models.embeddings",
    "IPAdapterFullImageProjection": "stablepipe.models.embeddings",
    "MultiIPAdapterImageProjection": "stablepipe.models.embeddings",
    "IPAdapterMixin": "stablepipe.loading.ip_adapter",
    "UNet2DConditionOutput": "stablepipe.models.unet",
    "AutoencoderKLOutput": "stablepipe.models.vae",
    "DecoderOutput": "stablepipe.models.vae",
    "StableDiffusionXLPipelineOutput": "stablepipe.pipelines.sdxl",
    "StableDiffusionSafePipelineOutput": "stablepipe.pipelines.safe",
    "SafetyConfig": "stablepipe.pipelines.safe",
    "DiffusionPipeline": "stablepipe.pipelines.base",
    "NonFiniteResultError": "stablepipe.pipelines.arguments",
    "StableDiffusionPipelineOutput": "stablepipe.pipelines.base",
    "LDM3DPipelineOutput": "stablepipe.pipelines.ldm3d",
    **PIPELINE_MODULES,  # the pipeline classes, from the table `pipeline_class` reads too
}


def _scheduler_exports() -> dict[str, str]:
    from stablepipe.schedulers import SCHEDULER_CLASSES

    return {name: "stablepipe.schedulers" for name in SCHEDULER_CLASSES}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None and name.endswith("Scheduler"):
        module = _scheduler_exports().get(name)
    if module is None:
        raise AttributeError(f"module 'stablepipe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*_EXPORTS, *_scheduler_exports(), "__version__"})
