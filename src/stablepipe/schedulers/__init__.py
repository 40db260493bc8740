"""Schedulers (samplers), drop-in compatible with diffusers' classes, configs and step API.

    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler = scheduler_from_name("DPM++ 2M Karras", pipe.scheduler.config)
"""

from __future__ import annotations

from stablepipe.schedulers.base import SchedulerMixin, SchedulerOutput
from stablepipe.schedulers.ddim import DDIMScheduler
from stablepipe.schedulers.ddpm import DDPMScheduler
from stablepipe.schedulers.deis import DEISMultistepScheduler
from stablepipe.schedulers.dpm_sde import BrownianTree, DPMSolverSDEScheduler
from stablepipe.schedulers.dpm_solver import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from stablepipe.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from stablepipe.schedulers.heun import HeunDiscreteScheduler
from stablepipe.schedulers.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from stablepipe.schedulers.lcm import LCMScheduler
from stablepipe.schedulers.lms import LMSDiscreteScheduler
from stablepipe.schedulers.names import (
    SCHEDULER_CLASSES,
    get_scheduler_class,
    list_scheduler_names,
    scheduler_from_name,
)
from stablepipe.schedulers.pndm import PNDMScheduler
from stablepipe.schedulers.unipc import UniPCMultistepScheduler

__all__ = [
    "SCHEDULER_CLASSES",
    "BrownianTree",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SchedulerMixin",
    "SchedulerOutput",
    "UniPCMultistepScheduler",
    "get_scheduler_class",
    "list_scheduler_names",
    "scheduler_from_name",
]
