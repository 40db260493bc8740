"""compat/run_diffusers_suite.py: the import rewriter swaps exactly the names stablepipe exports."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "compat" / "run_diffusers_suite.py"
spec = importlib.util.spec_from_file_location("run_diffusers_suite", SCRIPT)
suite = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = suite
spec.loader.exec_module(suite)

SOURCE = textwrap.dedent('''\
    import diffusers
    from diffusers import DDIMScheduler, FluxPipeline as Flux
    from diffusers.models.unets.unet_2d_condition import (
        UNet2DConditionModel,
        UNet2DConditionOutput,
    )
    from ..testing_utils import floats_tensor


    def make():
        from diffusers.utils import logging, BaseOutput
        return DDIMScheduler, diffusers.UNet2DConditionModel
''')


def test_rewriter_swaps_exported_names_only():
    exports = {"DDIMScheduler", "UNet2DConditionModel", "BaseOutput"}
    text, swapped = suite.rewrite_imports(SOURCE, exports)
    assert swapped == ["BaseOutput", "DDIMScheduler", "UNet2DConditionModel"]
    assert text.splitlines()[1:8] == [
        "from diffusers import FluxPipeline as Flux",
        "from stablepipe import DDIMScheduler",
        "from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput",
        "from stablepipe import UNet2DConditionModel",
        "from ..testing_utils import floats_tensor",
        "",
        "",
    ]
    assert "    from diffusers.utils import logging\n    from stablepipe import BaseOutput\n" in text
    assert "import diffusers\n" in text and "diffusers.UNet2DConditionModel" in text  # attribute use untouched
    assert suite.rewrite_imports(text, exports) == (text, [])  # a second pass changes nothing


def test_exports_and_causes():
    exports = suite.stablepipe_exports()
    assert {"StableDiffusionPipeline", "UNet2DConditionModel", "EulerDiscreteScheduler", "BaseOutput"} <= exports
    assert "annotations" not in exports and "Any" not in exports
    assert suite.cause_of("AssertionError: max diff 0.0123 at /tmp/x/y.py:12") == "AssertionError: max diff N at PATH:N"
