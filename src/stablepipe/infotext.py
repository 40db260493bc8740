"""AUTOMATIC1111's infotext: the `parameters` text chunk of a PNG, written and read back.

The format, as A1111's "PNG Info" tab, civitai and prompt readers parse it:

    a castle on a hill
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd15

The prompt comes first (any number of lines), then the negative prompt, then one line of `Key: value` pairs
separated by ", ". A value holding a comma, colon or newline is written as a JSON string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
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
