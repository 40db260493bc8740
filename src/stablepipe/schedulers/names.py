"""Sampler names that AUTOMATIC1111 and ComfyUI users know, mapped to a scheduler class and config options.

The A1111 names follow the table in diffusers' scheduler overview ("A1111/k-diffusion → 🤗 Diffusers").
ComfyUI's sampler names are accepted too, each with its k-diffusion sampler's equivalent.
"""

from __future__ import annotations

from typing import Any

from stablepipe.schedulers.base import SchedulerMixin
from stablepipe.schedulers.ddim import DDIMScheduler
from stablepipe.schedulers.ddpm import DDPMScheduler
from stablepipe.schedulers.deis import DEISMultistepScheduler
from stablepipe.schedulers.dpm_sde import DPMSolverSDEScheduler
from stablepipe.schedulers.dpm_solver import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from stablepipe.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from stablepipe.schedulers.heun import HeunDiscreteScheduler
from stablepipe.schedulers.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from stablepipe.schedulers.lcm import LCMScheduler
from stablepipe.schedulers.lms import LMSDiscreteScheduler
from stablepipe.schedulers.pndm import PNDMScheduler
from stablepipe.schedulers.unipc import UniPCMultistepScheduler


def _sigmas(kind: str | None = None) -> dict[str, bool]:
    """Options selecting one sigma schedule (and switching the others off)."""
    return {f"use_{k}_sigmas": k == kind for k in ("karras", "exponential", "beta")}


_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPM_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

# A1111 name -> (class, config overrides)
A1111_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {**_DPM_2M, **_sigmas()}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {**_DPM_2M, **_sigmas("karras")}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {**_DPM_2M_SDE, **_sigmas()}),
    "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {**_DPM_2M_SDE, **_sigmas("karras")}),
    "DPM++ SDE": (DPMSolverSinglestepScheduler, _sigmas()),
    "DPM++ SDE Karras": (DPMSolverSinglestepScheduler, _sigmas("karras")),
    "DPM2": (KDPM2DiscreteScheduler, _sigmas()),
    "DPM2 Karras": (KDPM2DiscreteScheduler, _sigmas("karras")),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, _sigmas()),
    "DPM2 a Karras": (KDPM2AncestralDiscreteScheduler, _sigmas("karras")),
    "Euler": (EulerDiscreteScheduler, _sigmas()),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, _sigmas()),
    "LMS": (LMSDiscreteScheduler, _sigmas()),
    "LMS Karras": (LMSDiscreteScheduler, _sigmas("karras")),
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": (UniPCMultistepScheduler, _sigmas()),
    "DEIS": (DEISMultistepScheduler, _sigmas()),
    "LCM": (LCMScheduler, {}),
}

# ComfyUI sampler name -> (class, config overrides), with its default ("normal") schedule
COMFYUI_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": A1111_SCHEDULERS["Euler"],
    "euler_ancestral": A1111_SCHEDULERS["Euler a"],
    "heun": A1111_SCHEDULERS["Heun"],
    "dpm_2": A1111_SCHEDULERS["DPM2"],
    "dpm_2_ancestral": A1111_SCHEDULERS["DPM2 a"],
    "lms": A1111_SCHEDULERS["LMS"],
    "dpmpp_2m": A1111_SCHEDULERS["DPM++ 2M"],
    "dpmpp_2m_sde": A1111_SCHEDULERS["DPM++ 2M SDE"],
    "dpmpp_sde": (DPMSolverSDEScheduler, _sigmas()),  # k-diffusion sample_dpmpp_sde
    "ddim": A1111_SCHEDULERS["DDIM"],
    "ddpm": A1111_SCHEDULERS["DDPM"],
    "uni_pc": A1111_SCHEDULERS["UniPC"],
    "deis": A1111_SCHEDULERS["DEIS"],
    "lcm": A1111_SCHEDULERS["LCM"],
}


def list_scheduler_names() -> list[str]:
    """Every name `scheduler_from_name` accepts: A1111's, then ComfyUI's."""
    return [*A1111_SCHEDULERS, *COMFYUI_SCHEDULERS]


def _lookup(name: str) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    table = {**A1111_SCHEDULERS, **COMFYUI_SCHEDULERS}
    if name in table:
        return table[name]
    folded = {key.casefold(): value for key, value in table.items()}
    if name.strip().casefold() in folded:
        return folded[name.strip().casefold()]
    raise ValueError(f"unknown scheduler name {name!r}; known names: {', '.join(list_scheduler_names())}")


def scheduler_from_name(name: str, config: dict[str, Any] | None = None, **overrides: Any) -> SchedulerMixin:
    """The scheduler an A1111 / ComfyUI sampler name stands for, built from `config` (e.g. a pipeline's
    scheduler config) with the name's options, then `overrides`, applied on top."""
    cls, options = _lookup(name)
    return cls.from_config(config or {}, **{**options, **overrides})


def get_scheduler_class(class_name: str) -> type[SchedulerMixin]:
    """A scheduler class by its diffusers name (as in model_index.json), with a clear error if unknown."""
    from stablepipe.schedulers import SCHEDULER_CLASSES

    if class_name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"unknown scheduler class {class_name!r}; stablepipe has {', '.join(SCHEDULER_CLASSES)}. "
            "Pick one of these with <Class>.from_config(config), or by name with scheduler_from_name()."
        )
    return SCHEDULER_CLASSES[class_name]


# A1111's "Schedule type" (its `scheduler` API field) -> the sigma schedule option it selects
SCHEDULE_TYPES: dict[str, str | None] = {"Automatic": None, "Karras": "karras", "Exponential": "exponential",
                                         "Beta": "beta"}


def split_a1111_name(name: str) -> tuple[str, str]:
    """A combined name -> A1111's (sampler, schedule type) as its infotext writes them:
    'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'), 'Euler a' -> ('Euler a', 'Automatic')."""
    for schedule in SCHEDULE_TYPES:
        base = name[: -len(schedule) - 1]
        if schedule != "Automatic" and name.endswith(" " + schedule) and base in A1111_SCHEDULERS:
            return base, schedule
    return name, "Automatic"


def join_a1111_name(sampler: str, schedule: str | None = None) -> str:
    """A1111's (sampler_name, scheduler) fields -> one name `scheduler_from_name` takes.

    Old clients send the schedule in the sampler name ('DPM++ 2M Karras'); that is accepted as is.
    Raises ValueError naming the known values for an unknown sampler or schedule type.
    """
    folded = {key.casefold(): key for key in SCHEDULE_TYPES}
    schedule_key = folded.get((schedule or "Automatic").strip().casefold())
    if schedule_key is None:
        raise ValueError(f"unknown schedule type {schedule!r}; known: {', '.join(SCHEDULE_TYPES)}")
    _lookup(sampler)  # a clear error for an unknown sampler
    if schedule_key == "Automatic" or split_a1111_name(sampler)[1] != "Automatic":
        return sampler
    combined = f"{sampler} {schedule_key}"
    if combined.casefold() not in {k.casefold() for k in A1111_SCHEDULERS}:
        raise ValueError(f"sampler {sampler!r} has no {schedule_key} schedule here; use 'Automatic' or one of: "
                         + ", ".join(k for k in A1111_SCHEDULERS if k.endswith(schedule_key)))
    return combined


def a1111_names_of(scheduler: SchedulerMixin) -> tuple[str, str]:
    """The (Sampler, Schedule type) A1111's infotext names a scheduler by: PNDM -> ('PLMS', 'Automatic'), Euler
    with Karras sigmas -> ('Euler', 'Karras'), DPM-Solver++ of order 2 with SDE noise -> ('DPM++ 2M SDE', ...).

    A class with one A1111 name gets that name; a class with several is told apart by the options other than
    the sigma schedule (algorithm, order). A scheduler A1111 has no name for keeps its class name.
    """
    config = scheduler.config
    kind = next((name for name, option in SCHEDULE_TYPES.items() if option and config.get(f"use_{option}_sigmas")),
                "Automatic")
    bases: dict[str, dict[str, Any]] = {}
    for name, (cls, options) in A1111_SCHEDULERS.items():
        if cls is type(scheduler):
            bases.setdefault(split_a1111_name(name)[0], {k: v for k, v in options.items() if not k.startswith("use_")})
    for base, options in bases.items():
        if len(bases) == 1 or all(config.get(k) == v for k, v in options.items()):
            return base, kind
    return type(scheduler).__name__, kind


def scheduler_from_a1111(sampler: str, schedule: str | None, config: dict[str, Any]) -> SchedulerMixin:
    """The scheduler A1111's (Sampler, Schedule type) stand for, built from `config`. A schedule the name table
    has no combined name for (e.g. 'Euler a' with 'Karras') is applied as the sigma option, when the class has it."""
    try:
        return scheduler_from_name(join_a1111_name(sampler, schedule), config)
    except ValueError:
        cls, _ = _lookup(sampler)
        option = SCHEDULE_TYPES.get(str(schedule).strip().capitalize())
        if option is None or f"use_{option}_sigmas" not in cls().config:
            raise
        return scheduler_from_name(sampler, config, **_sigmas(option))
