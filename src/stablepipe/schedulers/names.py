"""Sampler names that AUTOMATIC1111 and ComfyUI users know, mapped to a scheduler class and config options.

The A1111 names follow the table in diffusers' scheduler overview ("A1111/k-diffusion → 🤗 Diffusers").
ComfyUI's sampler names are accepted too, each with its k-diffusion sampler's equivalent.
"""

from __future__ import annotations

from typing import Any

from stablepipe.schedulers.base import SchedulerMixin, scheduler_classes
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

# diffusers' class name -> our class, for every public scheduler (in base.SCHEDULER_NAMES order). Built after the
# imports above, so that every scheduler class is defined.
SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {cls.__name__: cls for cls in scheduler_classes()}


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


def lookup_scheduler_name(name: str) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    table = {**A1111_SCHEDULERS, **COMFYUI_SCHEDULERS}
    folded = {key.casefold(): value for key, value in table.items()}
    key = name.strip().casefold()
    if name in table:
        return table[name]
    if key in folded:
        return folded[key]
    for schedule, option in SCHEDULE_TYPES.items():  # e.g. 'DPM++ 2M SDE Exponential', 'Euler a Karras'
        suffix = " " + schedule.casefold()
        if option and key.endswith(suffix) and key[: -len(suffix)] in folded:
            cls, options = folded[key[: -len(suffix)]]
            if f"use_{option}_sigmas" in cls().config:
                return cls, {**options, **_sigmas(option)}
    raise ValueError(f"unknown scheduler name {name!r}; known names: {', '.join(list_scheduler_names())}")


def scheduler_from_name(name: str, config: dict[str, Any] | None = None, **overrides: Any) -> SchedulerMixin:
    """The scheduler an A1111 / ComfyUI sampler name stands for, built from `config` (e.g. a pipeline's
    scheduler config) with the name's options, then `overrides`, applied on top."""
    cls, options = lookup_scheduler_name(name)
    return cls.from_config(config or {}, **{**options, **overrides})


def get_scheduler_class(class_name: str) -> type[SchedulerMixin]:
    """A scheduler class by its diffusers name (as in model_index.json), with a clear error if unknown."""
    if class_name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"unknown scheduler class {class_name!r}; stablepipe has {', '.join(SCHEDULER_CLASSES)}. "
            "Pick one of these with <Class>.from_config(config), or by name with scheduler_from_name()."
        )
    return SCHEDULER_CLASSES[class_name]


# A1111's "Schedule type" (its `scheduler` API field) -> the sigma schedule option it selects. "Uniform" is the
# model's own spacing; "Automatic" is each sampler's default in A1111 1.9+ (`A1111_AUTOMATIC`, else Uniform).
SCHEDULE_TYPES: dict[str, str | None] = {"Automatic": None, "Uniform": None, "Karras": "karras",
                                         "Exponential": "exponential", "Beta": "beta"}
A1111_AUTOMATIC: dict[str, str] = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                                   "DPM2": "Karras", "DPM2 a": "Karras"}


def plain_schedule(sampler: str) -> str:
    """The schedule type A1111 names the model's own spacing by for `sampler`: 'Automatic' where that is the
    sampler's default, 'Uniform' where A1111's Automatic would mean another schedule (Karras for DPM++ 2M)."""
    return "Uniform" if sampler in A1111_AUTOMATIC else "Automatic"


def split_a1111_name(name: str) -> tuple[str, str]:
    """A combined name -> A1111's (sampler, schedule type) as its infotext writes them:
    'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'), 'Euler a' -> ('Euler a', 'Automatic'), and 'DPM++ 2M' (the
    model's own spacing, as diffusers names it) -> ('DPM++ 2M', 'Uniform')."""
    for schedule, option in SCHEDULE_TYPES.items():
        base = name[: -len(schedule) - 1]
        if option and name.endswith(" " + schedule) and base in A1111_SCHEDULERS:
            return base, schedule
    return name, plain_schedule(name)


def join_a1111_name(sampler: str, schedule: str | None = None) -> str:
    """A1111's (sampler_name, scheduler) fields -> one name `scheduler_from_name` takes. 'Automatic' means the
    sampler's A1111 default ('DPM++ 2M' + 'Automatic' -> 'DPM++ 2M Karras'), 'Uniform' the model's own spacing.

    Old clients send the schedule in the sampler name ('DPM++ 2M Karras'); that is accepted as is.
    Raises ValueError naming the known values for an unknown sampler or schedule type.
    """
    folded = {key.casefold(): key for key in SCHEDULE_TYPES}
    schedule_key = folded.get((schedule or "Automatic").strip().casefold())
    if schedule_key is None:
        raise ValueError(f"unknown schedule type {schedule!r}; known: {', '.join(SCHEDULE_TYPES)}")
    lookup_scheduler_name(sampler)  # a clear error for an unknown sampler
    if split_a1111_name(sampler)[1] not in ("Automatic", "Uniform"):
        return sampler  # the schedule is in the name already
    canonical = next((k for k in A1111_SCHEDULERS if k.casefold() == sampler.strip().casefold()), sampler)
    if schedule_key == "Automatic":
        schedule_key = A1111_AUTOMATIC.get(canonical, "Uniform")
    if schedule_key == "Uniform":
        return sampler
    combined = f"{canonical} {schedule_key}"
    try:
        lookup_scheduler_name(combined)
    except ValueError:
        raise ValueError(f"sampler {sampler!r} has no {schedule_key} schedule here; use 'Uniform' or one of: "
                         + ", ".join(k for k in A1111_SCHEDULERS if k.endswith(schedule_key))) from None
    return combined


def a1111_names_of(scheduler: SchedulerMixin) -> tuple[str, str]:
    """The (Sampler, Schedule type) A1111's infotext names a scheduler by: PNDM -> ('PLMS', 'Automatic'), Euler
    with Karras sigmas -> ('Euler', 'Karras'), DPM-Solver++ of order 2 with SDE noise -> ('DPM++ 2M SDE', ...).

    A class with one A1111 name gets that name; a class with several is told apart by the options other than
    the sigma schedule (algorithm, order). A scheduler A1111 has no name for keeps its class name.
    """
    config = scheduler.config
    kind = next((name for name, option in SCHEDULE_TYPES.items() if option and config.get(f"use_{option}_sigmas")),
                None)
    bases: dict[str, dict[str, Any]] = {}
    for name, (cls, options) in A1111_SCHEDULERS.items():
        if cls is type(scheduler):
            bases.setdefault(split_a1111_name(name)[0], {k: v for k, v in options.items() if not k.startswith("use_")})
    for base, options in bases.items():
        if len(bases) == 1 or all(config.get(k) == v for k, v in options.items()):
            return base, kind or plain_schedule(base)
    return type(scheduler).__name__, kind or "Automatic"


def scheduler_from_a1111(sampler: str, schedule: str | None, config: dict[str, Any]) -> SchedulerMixin:
    """The scheduler A1111's (Sampler, Schedule type) stand for, built from `config`; a schedule the name table has
    no combined name for (e.g. 'Euler' with 'Exponential') is applied as the sigma option, when the class has it."""
    return scheduler_from_name(join_a1111_name(sampler, schedule), config)
