"""Run diffusers' own fast tests twice, on diffusers and with the imports swapped to stablepipe; write a table.

    python compat/run_diffusers_suite.py --diffusers-src /tmp/diffusers-src --extra-tests /tmp/diffusers-legacy

Every `from diffusers[.a.b] import X` in the copied tests becomes `from stablepipe import X` when stablepipe
exports X; the test code and its assertions are untouched. Each test file runs in its own pytest process per
side, with its JUnit XML kept under `--work`, so a partial run is usable and `--only` reruns single files.
`--report-only` rebuilds the document from the results already there. See compat/README.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SIDES = ("diffusers", "stablepipe")
PIPELINE_FILES = [
    "pipelines/stable_diffusion/test_stable_diffusion.py",
    "pipelines/stable_diffusion/test_stable_diffusion_img2img.py",
    "pipelines/stable_diffusion/test_stable_diffusion_inpaint.py",
    "pipelines/stable_diffusion_2/test_stable_diffusion.py",
    "pipelines/stable_diffusion_2/test_stable_diffusion_depth.py",
    "pipelines/stable_diffusion_2/test_stable_diffusion_inpaint.py",
    "pipelines/stable_diffusion_2/test_stable_diffusion_upscale.py",
    "pipelines/stable_diffusion_2/test_stable_diffusion_latent_upscale.py",
    "pipelines/stable_diffusion_2/test_stable_diffusion_v_pred.py",
    "pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
    "pipelines/stable_diffusion_xl/test_stable_diffusion_xl_img2img.py",
    "pipelines/stable_diffusion_xl/test_stable_diffusion_xl_inpaint.py",
    "pipelines/stable_diffusion_image_variation/test_stable_diffusion_image_variation.py",
    "pipelines/stable_diffusion_safe/test_safe_diffusion.py",
    "pipelines/stable_diffusion_ldm3d/test_stable_diffusion_ldm3d.py",
]
MODEL_FILES = [
    "models/unets/test_models_unet_2d_condition.py",
    "models/autoencoders/test_models_autoencoder_kl.py",
]
NOT_MATCHED = Path(__file__).with_name("not_matched.md")
# Modules diffusers has moved since the (older) tests were written: fixed on both sides alike.
MOVED_MODULES = {"diffusers.pipelines.stable_diffusion_safe": "diffusers.pipelines.deprecated.stable_diffusion_safe"}


# ---------------------------------------------------------------------------------------------------------------
# The import rewriter


def stablepipe_exports() -> set[str]:
    """The public names `from stablepipe import X` gives."""
    import stablepipe

    return {name for name in dir(stablepipe) if not name.startswith("_")}


def _alias_text(alias: ast.alias) -> str:
    return alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"


def _import_lines(module: str, aliases: list[ast.alias], indent: str) -> list[str]:
    return [f"{indent}from {module} import {', '.join(_alias_text(a) for a in aliases)}"] if aliases else []


def _is_diffusers_import(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.ImportFrom)
        and node.level == 0
        and node.module is not None
        and (node.module == "diffusers" or node.module.startswith("diffusers."))
    )


def rewrite_imports(source: str, exports: set[str]) -> tuple[str, list[str]]:
    """Swap the names of `from diffusers[...] import ...` that stablepipe exports; return (source, swapped)."""
    lines = source.splitlines()
    edits: list[tuple[int, int, list[str]]] = []
    swapped: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not _is_diffusers_import(node):
            continue
        ours = [a for a in node.names if a.name in exports]
        first = lines[node.lineno - 1]
        if not ours or first[: node.col_offset].strip():  # nothing to swap, or `x; from ...` on one line
            continue
        indent = first[: node.col_offset]
        theirs = [a for a in node.names if a.name not in exports]
        new = _import_lines(node.module, theirs, indent) + _import_lines("stablepipe", ours, indent)
        edits.append((node.lineno - 1, node.end_lineno, new))
        swapped += [a.name for a in ours]
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    return "\n".join(lines) + ("\n" if source.endswith("\n") else ""), sorted(set(swapped))


def copy_tests(sources: list[Path], dest: Path, exports: set[str] | None) -> dict[str, list[str]]:
    """Copy each source's `tests/` into `dest/tests` (later sources overlay), rewriting imports if `exports` is
    given. Each file is replaced atomically and only when it changes, so runs reading the tree (other workers'
    pytest processes) never see a half-written or not-yet-rewritten file."""
    files = {path.relative_to(src / "tests"): path for src in sources for path in (src / "tests").rglob("*")
             if path.is_file() and "__pycache__" not in path.parts}
    swapped: dict[str, list[str]] = {}
    for relative, path in files.items():
        data = path.read_bytes()
        if path.suffix == ".py":
            data = moved_modules(data.decode()).encode()
        if exports is not None and path.suffix == ".py":
            text, names = rewrite_imports(data.decode(), exports)
            if names:
                data, swapped[str(relative)] = text.encode(), names
        write_atomically(dest / "tests" / relative, data)
    return swapped


def moved_modules(source: str) -> str:
    for old, new in MOVED_MODULES.items():
        source = re.sub(rf"\b{re.escape(old)}\b", new, source)
    return source


def write_atomically(target: Path, data: bytes) -> None:
    if target.exists() and target.read_bytes() == data:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------------------
# Running and reading results


@dataclass
class FileResult:
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> passed / failed / error / skipped
    messages: dict[str, str] = field(default_factory=dict)  # test id -> first line of the failure


def result_path(work: Path, side: str, test_file: str) -> Path:
    return work / "results" / side / (test_file.replace("/", "__") + ".xml")


def provision_hub_cache(cache: Path) -> Path:
    """An offline Hugging Face cache holding what the fast tests download: `hf-internal-testing/tiny-random-clip`
    (their tokenizer), here stablepipe's built-in tiny CLIP tokenizer (about 530 tokens, within the tests'
    1000-token text encoders). Tests whose expected numbers were computed with the Hub's tokenizer then fail on
    diffusers too, and so drop out of the count."""
    from stablepipe.builtin import write_tiny_tokenizer

    repo = cache / "models--hf-internal-testing--tiny-random-clip"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    write_tiny_tokenizer(repo / "snapshots" / ("0" * 40))
    return cache


def test_env(work: Path) -> dict[str, str]:
    """The tests' environment: offline, with the provisioned cache (tests never reach the network here)."""
    cache = work / "hub-cache"
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


def run_file(work: Path, side: str, test_file: str, timeout: int) -> None:
    """One pytest process for one file; its JUnit XML lands under `work/results/side`."""
    xml = result_path(work, side, test_file)
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--timeout={timeout}",
           "-o", "addopts=", f"--junitxml={xml}", f"tests/{test_file}"]
    log = xml.with_suffix(".log")
    with log.open("w") as out:
        try:
            subprocess.run(cmd, cwd=work / side, stdout=out, stderr=subprocess.STDOUT, timeout=timeout * 20,
                           env=test_env(work))
        except subprocess.TimeoutExpired:
            out.write(f"\nfile run killed after {timeout * 20} s\n")


def _first_line(element: ET.Element) -> str:
    text = element.get("message") or (element.text or "")
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return "(no message)"


def read_results(xml: Path) -> FileResult | None:
    if not xml.exists():
        return None
    result = FileResult()
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = tag if tag != "failure" else "failed"
                result.messages[test_id] = _first_line(child)
                break
        result.outcomes[test_id] = outcome
    return result


# ---------------------------------------------------------------------------------------------------------------
# The report


def cause_of(message: str) -> str:
    """A failure's message with its numbers, addresses and paths blurred, so that one cause groups together."""
    text = re.sub(r"0x[0-9a-f]+", "0x…", message)
    text = re.sub(r"/[\w./+-]+", "PATH", text)
    text = re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e-?\d+)?", "N", text)
    text = re.sub(r"tensor\(.*", "tensor(…)", text)
    return text[:160]


def file_rows(work: Path, files: list[str]) -> tuple[list[str], list[tuple[str, str, str]], list[int]]:
    rows, failures, totals = [], [], [0, 0]
    for test_file in files:
        theirs = read_results(result_path(work, "diffusers", test_file))
        ours = read_results(result_path(work, "stablepipe", test_file))
        if theirs is None:
            rows.append(f"| `{test_file}` | not run | | |")
            continue
        passing = [t for t, o in theirs.outcomes.items() if o == "passed"]
        if ours is None:
            rows.append(f"| `{test_file}` | {len(passing)} | not run | |")
            continue
        ok = [t for t in passing if ours.outcomes.get(t) == "passed"]
        share = f"{100 * len(ok) / len(passing):.0f} %" if passing else "–"
        rows.append(f"| `{test_file}` | {len(passing)} | {len(ok)} | {share} |")
        totals[0] += len(passing)
        totals[1] += len(ok)
        for test in passing:
            if ours.outcomes.get(test) != "passed":
                message = ours.messages.get(test, f"not collected ({ours.outcomes.get(test, 'missing')})")
                failures.append((test_file, test, message))
    return rows, failures, totals


def write_report(work: Path, files: list[str], out: Path, header: str, not_matched: str) -> tuple[int, int]:
    rows, failures, totals = file_rows(work, files)
    groups: dict[str, list[str]] = defaultdict(list)
    for test_file, test, message in failures:
        groups[cause_of(message)].append(f"{Path(test_file).stem}::{test}")
    lines = [header, "", "| test file | pass on diffusers | of those, pass on stablepipe | share |"]
    lines += ["|---|---:|---:|---:|"]
    lines += rows
    share = 100 * totals[1] / totals[0] if totals[0] else 0.0
    lines += [f"| **all** | **{totals[0]}** | **{totals[1]}** | **{share:.1f} %** |", ""]
    lines += ["## Failures on stablepipe, grouped by cause", ""]
    for cause, tests in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(f"`{t}`" for t in tests[:6]) + (f" and {len(tests) - 6} more" if len(tests) > 6 else "")
        lines.append(f"- **{len(tests)}** × `{cause}`: {shown}")
    lines += ["", not_matched.strip(), ""]
    out.write_text("\n".join(lines))
    return totals[0], totals[1]


def header_text(src: Path) -> str:
    version = re.search(r'version="([^"]+)"', (src / "setup.py").read_text()) if (src / "setup.py").exists() else None
    import diffusers

    return "\n".join([
        "# diffusers' own fast tests, imports swapped to stablepipe",
        "",
        "Written by `compat/run_diffusers_suite.py` (see `compat/README.md`). Tests from a diffusers checkout "
        f"(setup.py version {version.group(1) if version else 'unknown'}), run against the installed diffusers "
        f"{diffusers.__version__} and then with every `from diffusers... import X` that stablepipe exports "
        "swapped to `from stablepipe import X`. A test counts if it passes on diffusers; the last columns say how "
        "many of those pass on stablepipe too. Files whose imports name nothing stablepipe exports are left out "
        "(they would test diffusers against itself).",
    ])


def scheduler_files(work: Path) -> list[str]:
    folder = work / "stablepipe" / "tests" / "schedulers"
    return sorted(f"schedulers/{p.name}" for p in folder.glob("test_*.py"))


def swapped_files(swapped: dict[str, list[str]], candidates: list[str]) -> list[str]:
    """Only files where at least one import was swapped: the others would test diffusers against itself."""
    return [f for f in candidates if f in swapped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-src", type=Path, required=True, help="a diffusers checkout (has tests/)")
    parser.add_argument("--extra-tests", type=Path, action="append", default=[],
                        help="another tree with tests/ laid over it (tests diffusers has since removed)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffusers-suite"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/diffusers-suite.md")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the test files to (re)run")
    parser.add_argument("--side", choices=[*SIDES, "both"], default="both")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per test (pytest-timeout)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--note", default="", help="a paragraph for the top of the document (how the run went)")
    parser.add_argument("--skip-done", action="store_true", help="skip files whose results are there already")
    args = parser.parse_args(argv)
    if not (args.diffusers_src / "tests").is_dir():
        parser.error(f"{args.diffusers_src} has no tests/ folder; pass the root of a diffusers source checkout")
    sources = [args.diffusers_src, *args.extra_tests]
    swapped_json = args.work / "swapped.json"
    if not args.report_only or not swapped_json.exists():
        copy_tests(sources, args.work / "diffusers", None)
        swapped = copy_tests(sources, args.work / "stablepipe", stablepipe_exports())
        swapped_json.write_text(json.dumps(swapped, indent=1, sort_keys=True))
        provision_hub_cache(args.work / "hub-cache")
    swapped = json.loads(swapped_json.read_text())
    files = swapped_files(swapped, PIPELINE_FILES + MODEL_FILES + scheduler_files(args.work))
    if not args.report_only:
        chosen = [f for f in files if args.only is None or any(s in f for s in args.only)]
        sides = SIDES if args.side == "both" else (args.side,)
        for test_file in chosen:
            for side in sides:
                if args.skip_done and result_path(args.work, side, test_file).exists():
                    continue
                print(f"{side:10} {test_file}", flush=True)
                run_file(args.work, side, test_file, args.timeout)
    header = header_text(args.diffusers_src) + (f"\n\n{args.note}" if args.note else "")
    total, ours = write_report(args.work, files, args.out, header, NOT_MATCHED.read_text())
    print(f"{ours} of {total} diffusers-passing tests pass on stablepipe; table in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
