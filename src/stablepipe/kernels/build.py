"""Building the compiled kernels at first use, into the user's cache, for this CPU and this torch only.

The C++ sources in `csrc/` are compiled by `torch.utils.cpp_extension` with `-O3 -march=native` into torch's
extension folder (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`, shared by every stablepipe
cache). Such a build uses every instruction of the CPU it was made on, so its folder is named by a hash of the
source, the torch version, the compiler and the CPU's model and flags; another CPU (or torch) builds its own.
Only x86-64 CPUs with AVX-512 get a build (the kernels need it); elsewhere, and when the build fails,
`compiled_ops()` returns None and PyTorch's own kernels run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger("stablepipe.kernels")
SOURCES = (Path(__file__).parent / "csrc" / "attention.cpp",)
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")  # -fopenmp: at::parallel_for
# is inline in ATen's headers; compiled without it, its `omp parallel` is ignored and the kernel runs on one thread
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")


def cpu_description() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags, from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor(), set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", ""), set(fields.get("flags", "").split())


def build_key() -> str:
    """What a build depends on: the sources, the flags, torch, the compiler and the CPU."""
    model, flags = cpu_description()
    digest = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES), " ".join(FLAGS), torch.__version__, os.environ.get("CXX", "c++"),
                 model, " ".join(sorted(flags))):  # fmt: skip
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def unavailable_reason() -> str | None:
    """Why this machine gets no build (None: it can try one)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernels are written for x86-64 with AVX-512, this CPU is {platform.machine()}"
    missing = [flag for flag in NEEDED_CPU_FLAGS if flag not in cpu_description()[1]]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


@functools.cache
def compiled_ops():
    """`torch.ops.stablepipe_kernels`, built (or loaded from the cache) on first call; None where it cannot be."""
    reason = unavailable_reason()
    if reason is not None:  # nothing to fix: said quietly
        log.info("stablepipe: the compiled CPU kernels are not used, %s; PyTorch's kernels run instead", reason)
        return None
    try:
        return _load()
    except Exception as error:  # a missing compiler, a failed build: any of them means "use PyTorch's kernel"
        last_line = (str(error).strip().splitlines() or [""])[-1]
        log.warning(
            "stablepipe: the compiled CPU kernels are not used, the build failed (%s: %s); PyTorch's "
            "kernels run instead (STABLEPIPE_KERNELS=0 skips the build)",
            type(error).__name__,
            last_line,
        )
        return None


def _load():
    from torch.utils import cpp_extension

    key = build_key()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()  # as torch reads it
    folder = Path(root, f"stablepipe_kernels_{key}")
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"stablepipe_kernels_{key}", sources=[str(p) for p in SOURCES], extra_cflags=list(FLAGS),
        extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False, verbose=False,
    )  # fmt: skip
    ops = torch.ops.stablepipe_kernels
    kinds = {1: "float32", 2: "bfloat16"}
    supported = [name for bit, name in kinds.items() if ops.capabilities() & bit]
    log.info("stablepipe: attention runs on the compiled CPU kernel for %s (built in %s)", supported, folder)
    return ops
