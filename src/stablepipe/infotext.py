"""AUTOMATIC1111's infotext: the `parameters` text chunk of a PNG, written and read back.

The format, as A1111's "PNG Info" tab, civitai and prompt readers parse it:

    a castle on a hill
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd15

The prompt comes first (any number of lines), then the negative prompt, then one line of `Key: value` pairs
separated by ", ". A value holding a comma, colon or newline is written as a JSON string.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NEGATIVE = "Negative prompt:"

# `Key: value` where value is a JSON string or runs to the next comma
_PARAM = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: Any) -> str:
    """A value as A1111 writes it: as is, or as a JSON string when it holds ',', ':' or a newline."""
    text = str(value)
    if any(c in text for c in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_number(value: Any) -> str:
    """7.0 -> '7', 7.5 -> '7.5' (A1111 prints CFG scale and strengths as Python floats, trimmed)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, Any]) -> str:
    """The infotext of one image; `params` in A1111's order (Steps, Sampler, Schedule type, CFG scale, Seed,
    Size, Model hash, Model, Denoising strength, ...); None values are left out."""
    line = ", ".join(f"{k}: {quote(format_number(v))}" for k, v in params.items() if v is not None)
    text = prompt or ""
    if negative_prompt:
        text += f"\n{NEGATIVE} {negative_prompt}"
    return f"{text}\n{line}" if line else text


def parse_params_line(line: str) -> dict[str, str]:
    """`Steps: 20, Sampler: Euler a, ...` -> {'Steps': '20', 'Sampler': 'Euler a', ...} (JSON strings unquoted)."""
    params: dict[str, str] = {}
    for key, value in _PARAM.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # kept as written: a reader must never fail on a hand-edited infotext
        params[key.strip()] = value
    return params


def parse_infotext(text: str) -> dict[str, Any]:
    """Infotext -> {'Prompt': ..., 'Negative prompt': ..., 'Steps': '20', ..., 'Size-1': 512, 'Size-2': 512}.

    Values stay strings as written (A1111's reader does the same before typing them), except the Size split
    into width (`Size-1`) and height (`Size-2`). The last line is the settings line when it holds at least
    three `Key: value` pairs; otherwise everything is prompt.
    """
    lines = text.strip("\n").split("\n")
    params: dict[str, Any] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        params = parse_params_line(lines.pop())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE) :].lstrip()
        (negative if in_negative else prompt).append(line)
    size = _SIZE.match(str(params.get("Size", "")))
    if size:
        params["Size-1"], params["Size-2"] = int(size[1]), int(size[2])
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


# ---- writing: the parameters of one image, in A1111's order ----------------------------------------------------


def a1111_params(
    *, steps: int, sampler: str, schedule_type: str | None = "Automatic", cfg_scale: float | None, seed: int,
    width: int, height: int, model_hash: str | None = None, model: str | None = None,
    denoising_strength: float | None = None, clip_skip: int | None = None,
    lora_hashes: Mapping[str, str] | None = None, extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings line of one image as A1111's `create_infotext` orders it, ready for `format_infotext`.

    `clip_skip` is diffusers' (the number of final CLIP layers skipped: 1 = the penultimate layer); A1111 counts
    the layer it stops at, so it is written as `Clip skip: clip_skip + 1`, and left out when no layer is skipped.
    `lora_hashes` maps each LoRA's name to its short hash (`Lora hashes: "name: 0123456789"`); `extras` are
    further `Key: value` pairs, written after the standard ones as A1111 writes its extra generation params.
    """
    params: dict[str, Any] = {
        "Steps": int(steps), "Sampler": sampler, "Schedule type": schedule_type or "Automatic",
        "CFG scale": None if cfg_scale is None else float(cfg_scale), "Seed": int(seed),
        "Size": f"{int(width)}x{int(height)}",
        "Model hash": model_hash, "Model": model,
        "Denoising strength": None if denoising_strength is None else float(denoising_strength),
        "Clip skip": clip_skip + 1 if clip_skip else None,
        **(extras or {}),
    }
    if lora_hashes:
        params["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in lora_hashes.items())
    return params


# ---- reading: an infotext back into generation settings --------------------------------------------------------

# the keys `read_settings` turns into settings, and those that never change the picture
READ_KEYS = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip")
HARMLESS_KEYS = ("Prompt", "Negative prompt", "Size-1", "Size-2", "Model hash", "Model", "Version", "User")


def _typed(key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"the infotext's {key} is {value!r}, not a {kind.__name__} number") from None


def read_settings(text: str) -> tuple[dict[str, Any], dict[str, str]]:
    """An infotext -> (settings, others): settings with stablepipe's names and types (`prompt`, `negative_prompt`,
    `steps`, `sampler`, `schedule_type`, `guidance`, `seed`, `width`, `height`, `strength`, `clip_skip` as
    diffusers counts it, `model`, `model_hash`; only those present), and the other keys, which may change the
    picture (`Hires upscale`, `Lora hashes`, ...), as written."""
    params = parse_infotext(text)
    settings: dict[str, Any] = {"prompt": params["Prompt"], "negative_prompt": params["Negative prompt"] or None}
    kinds = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
             "Denoising strength": ("strength", float)}
    for key, (name, kind) in kinds.items():
        if key in params:
            settings[name] = _typed(key, params[key], kind)
    if "Sampler" in params:
        settings["sampler"], settings["schedule_type"] = params["Sampler"], params.get("Schedule type", "Automatic")
    if "Size" in params and "Size-1" not in params:
        raise ValueError(f"the infotext's Size is {params['Size']!r}, not WIDTHxHEIGHT")
    if "Size-1" in params:
        settings["width"], settings["height"] = params["Size-1"], params["Size-2"]
    if "Clip skip" in params:  # A1111 counts the layer it stops at: 1 = the last layer, no skipping
        settings["clip_skip"] = _typed("Clip skip", params["Clip skip"], int) - 1 or None
    settings.update({name: params[key] for key, name in (("Model", "model"), ("Model hash", "model_hash"))
                     if key in params})
    others = {k: v for k, v in params.items() if k not in (*READ_KEYS, *HARMLESS_KEYS)}
    return settings, others


# ---- model names and hashes, as A1111 writes them ---------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path: str | os.PathLike, *, cache: Path | None = None) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256 (its "Model hash" since v1.6).

    A diffusers folder (which A1111 cannot load, so it has no hash of its own) gets the first 10 hex digits of
    the sha256 of its weight files' list, one `relative/path sha256` line each in sorted order: any changed
    weight changes it, and copying or moving the folder does not. Hashes are kept in `cache` (a JSON file, keyed
    by path, size and modification time), as A1111 keeps its cache.json, so a large file is read once.
    """
    path = Path(path).resolve()
    if path.is_file():
        return _cached_sha256(path, cache)[:10]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}) to hash")
    lines = "".join(f"{p.relative_to(path).as_posix()} {_cached_sha256(p, cache)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()[:10]


def _cached_sha256(path: Path, cache: Path | None) -> str:
    stat = path.stat()
    key, stamp = str(path), f"{stat.st_size}:{stat.st_mtime_ns}"
    known = _read_cache(cache)
    if known.get(key, {}).get("stamp") == stamp:
        return known[key]["sha256"]
    digest = sha256_file(path)
    if cache is not None:
        known[key] = {"stamp": stamp, "sha256": digest}
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        staging.write_text(json.dumps(known))
        os.replace(staging, cache)  # concurrent writers: the last one wins, each file is whole
    return digest


def _read_cache(cache: Path | None) -> dict[str, Any]:
    if cache is None or not cache.is_file():
        return {}
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt
    return known if isinstance(known, dict) else {}


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's short LoRA hash (its `Lora hashes:` entries): the first 12 hex digits of the sha256 of a
    .safetensors file's tensor data (the bytes after its JSON header, kohya's "addnet" hash), or of the whole
    file for other formats."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if path.suffix.lower() == ".safetensors":
            header = int.from_bytes(file.read(8), "little")
            file.seek(8 + header)
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def model_name(source: str | os.PathLike) -> str:
    """The `Model:` of an infotext: a file's name without its extension (as A1111 writes it), a folder's name,
    or a Hub repo id as given."""
    text = str(source).rstrip("/\\")
    path = Path(text)
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        return path.stem
    return path.name if path.exists() else text


def local_model_hash(source: str | os.PathLike) -> str | None:
    """`model_hash` of a model file, folder or Hub repo in the local cache (hashes kept in the stablepipe cache's
    hashes.json); None where there is no local copy."""
    from stablepipe.cache import cache_dir
    from stablepipe.loading.files import fetch_file

    try:
        local = Path(source) if Path(source).exists() else fetch_file(source, "model_index.json").parent
        return model_hash(local, cache=cache_dir() / "hashes.json")
    except (OSError, ValueError):
        return None
