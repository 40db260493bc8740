"""The model flags that every front end takes, turned into a loaded pipeline and back into its settings.

`--model` (a Hub id, a diffusers folder or one .safetensors / .ckpt file; the built-in model when none),
`--variant`, `--revision`, `--device`, `--dtype`, `--no-safety-checker`, `--config`, `--lora`, `--embedding`,
`--prompt-weighting`, `--scheduler`, `--clip-skip`: the command line passes its parsed flags, batch jobs their
model options, both as an object with these attributes. Bad values raise ValueError saying what to give.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def pick_device_and_dtype(device: str, dtype: str):
    """--device and --dtype resolved: "auto" picks CUDA where there is one, and the fast dtype of the device."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    checked = check_device(device)
    if dtype == "auto":  # bfloat16 on CPUs with native bfloat16, float16 on CUDA (pipelines/memory.py)
        from stablepipe.pipelines.memory import fast_dtype

        return checked, fast_dtype(device)
    return checked, getattr(torch, dtype)


def check_device(device: str):
    """--device as a torch.device this machine has, or a ValueError saying what it has."""
    import torch

    try:
        checked = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; use auto, cpu, cuda, cuda:1, mps ...") from None
    kind = checked.type
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    if kind != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        no_cuda = kind == "cuda" and not torch.version.cuda
        built = f" (this torch {torch.__version__} is built without CUDA)" if no_cuda else ""
        raise ValueError(f"--device {device}: no {kind} device is available here{built}; use --device cpu")
    if kind == "cuda" and checked.index is not None and checked.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return checked


def load_pipeline_from_flags(cls: type, args: Any, say: Callable[[str], object]) -> Any:
    """The `cls` pipeline named by --model (the built-in model when none), on --device in --dtype, with --lora,
    --embedding, --prompt-weighting, --scheduler and --clip-skip applied; `args` holds the flags as attributes
    (an argparse.Namespace of the command line, or batch jobs' model options). `say` reports the fallback."""
    import torch
    import transformers

    from stablepipe.builtin import builtin_model_note, builtin_model_path

    transformers.utils.logging.disable_progress_bar()  # the command shows its own progress
    model = args.model
    if model is None:
        say(f"No --model given: using {builtin_model_note()}.")
        model = builtin_model_path()
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    extra = {}
    if args.no_safety_checker and "safety_checker" in cls.component_names():  # SDXL has none
        extra["safety_checker"] = None
        if "requires_safety_checker" in cls._config_keys:  # depth2img and the upscalers have no such setting
            extra["requires_safety_checker"] = False
    if is_single_file(model):
        if args.variant:
            raise ValueError("--variant is for diffusers folders and Hub repos, not single files")
        config = getattr(args, "config", None)
        pipe = cls.from_single_file(model, config=config, torch_dtype=dtype, revision=args.revision, **extra)
    elif getattr(args, "config", None):
        raise ValueError("--config describes a single-file --model (.safetensors / .ckpt); drop it for folders")
    else:
        pipe = cls.from_pretrained(model, torch_dtype=dtype, variant=args.variant, revision=args.revision, **extra)
    add_adapters(pipe, args)
    set_scheduler(pipe, args)
    check_clip_skip(pipe, getattr(args, "clip_skip", None))
    pipe.loaded_from = model  # what the PNGs' Model and Model hash name
    pipe.set_progress_bar_config(disable=args.quiet or args.json)
    pipe.to(device)
    if args.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        pipe.enable_channels_last()  # the CPU fast path (benchmarks/RESULTS.md: float32 gains less, costs memory)
    return pipe


def set_scheduler(pipe: Any, args: Any) -> None:
    """--scheduler by name; else the sampler of a --from-png file, unless the model's own already is it."""
    from stablepipe.schedulers.names import a1111_names_of, scheduler_from_a1111, scheduler_from_name

    if getattr(args, "scheduler", None):
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    elif getattr(args, "png_sampler", None) and tuple(args.png_sampler) != a1111_names_of(pipe.scheduler):
        pipe.scheduler = scheduler_from_a1111(*args.png_sampler, pipe.scheduler.config)


def check_clip_skip(pipe, clip_skip: int | None) -> None:
    """--clip-skip within the text encoder's layers (0 .. layers - 1)."""
    encoder = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
    if clip_skip is None or encoder is None:
        return
    layers = encoder.config.num_hidden_layers
    if not 0 <= clip_skip < layers:
        raise ValueError(f"--clip-skip {clip_skip}: this text encoder has {layers} layers, so skip 0 to "
                         f"{layers - 1} of them (AUTOMATIC1111's 'Clip skip 2' is --clip-skip 1)")


def is_single_file(model: str | Path) -> bool:
    """A .safetensors / .ckpt / .pt / .bin file, local or a Hub file URL, rather than a folder or repo id."""
    text = str(model)
    return text.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")) and not Path(text).is_dir()


def split_option(value: str, flag: str) -> tuple[str, str | None]:
    """"path:extra" -> (path, extra); a Windows drive letter or a URL scheme is not taken for the separator."""
    head, sep, tail = value.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail or len(head) == 1:
        return value, None
    if not tail:
        raise ValueError(f"{flag} {value!r}: nothing after ':'")
    return head, tail


def add_adapters(pipe: Any, args: Any) -> None:
    """--lora, --embedding and --prompt-weighting on a loaded pipeline."""
    names, scales = [], []
    for i, value in enumerate(getattr(args, "lora", [])):
        source, scale = split_option(value, "--lora")
        try:
            scales.append(float(scale) if scale is not None else 1.0)
        except ValueError:
            raise ValueError(f"--lora {value!r}: the scale after ':' must be a number, e.g. {source}:0.8") from None
        names.append(f"lora_{i}")
        pipe.load_lora_weights(source, adapter_name=names[-1])
    if names:
        pipe.set_adapters(names, scales)
    for value in getattr(args, "embedding", []):
        source, token = split_option(value, "--embedding")
        pipe.load_textual_inversion(source, token=token)
    pipe.prompt_weighting = bool(getattr(args, "prompt_weighting", False))


def call_default(pipe, name: str) -> Any:
    """The default of the pipeline's `__call__` argument `name` (e.g. its steps and guidance), or None."""
    import inspect

    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def model_settings(pipe, source: str | None) -> dict[str, Any]:
    """Model (as given), Model hash (see `local_model_hash`) and the A1111 sampler names of the scheduler."""
    from stablepipe.infotext import local_model_hash
    from stablepipe.schedulers.names import a1111_names_of

    sampler, schedule = a1111_names_of(pipe.scheduler)
    loaded = getattr(pipe, "loaded_from", None) or source
    return {"model": str(source or "builtin"), "model_hash": local_model_hash(loaded) if loaded else None,
            "sampler": sampler, "schedule_type": schedule}


def lora_hashes(loras: list[str]) -> dict[str, str]:
    """{name: A1111's short hash} of the local --lora files (as A1111 names a LoRA: its file name)."""
    from stablepipe.infotext import lora_hash

    found = {}
    for value in loras:
        path = Path(split_option(value, "--lora")[0])
        if path.is_file():
            found[path.stem] = lora_hash(path)
    return found
