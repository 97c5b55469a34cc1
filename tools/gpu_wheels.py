"""The wheels a GPU machine without network needs for the study, downloaded here into an ignored folder
that a GPU call carries (``carry: [".whl"]``), and checked against the size a call may carry.

    python tools/gpu_wheels.py --twin /tmp/device-twin/bin/python      # writes .whl/ and prints its size

``--twin`` is an interpreter with the GPU machine's packages (Python 3.12, torch, triton, numpy, einops).
1. pip resolves the packages that ``tools/gpu_run.py`` installs when they are missing (accelerate,
   Pillow, matplotlib, tqdm) against that environment (``pip install --dry-run --report``), and keeps
   what they need that it lacks: the requested packages and their requirements, followed through the
   packages to install only (so that torch's own CUDA libraries, which the GPU machine has beside its
   torch, stay out).
2. ``pip download --no-deps`` fetches exactly those versions as CPython 3.12 manylinux x86_64 wheels
   (glibc 2.28 or older, as torch's own wheel needs) into ``--dest``, which holds nothing else after.
3. It installs them as the GPU run does (``pip install --no-index --no-deps --target``) into a
   temporary folder and imports the packages with the twin: the wheels are complete for that machine.
4. It adds the wheels to the files a call carries (tracked and untracked files not ignored) and fails
   if they exceed the 64 MiB a call may carry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gpu_run import ROOT, STUDY_PACKAGES, install_command, missing_modules, with_site  # noqa: E402

CARRY_LIMIT = 64 * 2**20  # bytes a device call may carry: the working tree and its carried folders together
# torch 2.11's own wheel is manylinux_2_28, so the GPU machine's glibc is at least 2.28
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                     "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(report: dict) -> dict[str, str]:
    """From pip's installation report: name -> version of the requested packages and, transitively, of the
    packages to install that they require (markers evaluated for the report's environment, no extras)."""
    install = {canonical(item["metadata"]["name"]): item for item in report["install"]}
    env = {**default_environment(), **report["environment"], "extra": ""}
    todo = [name for name, item in install.items() if item.get("requested")]
    keep = {}
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        metadata = install[name]["metadata"]
        keep[name] = metadata["version"]
        for line in metadata.get("requires_dist", []):
            req = Requirement(line)
            if canonical(req.name) in install and (req.marker is None or req.marker.evaluate(env)):
                todo.append(canonical(req.name))
    return keep


def carried_tree_bytes() -> int:
    """The size of what a device call sends besides carried folders: tracked and untracked files not ignored."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in set(files) if f and (ROOT / f).is_file())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--twin", required=True, help="a Python with the GPU machine's packages")
    p.add_argument("--dest", type=Path, default=ROOT / ".whl", help="the wheel folder (default .whl, git-ignored)")
    args = p.parse_args(argv)
    packages = list(STUDY_PACKAGES.values())
    with tempfile.TemporaryDirectory() as tmp:
        report_file = Path(tmp) / "report.json"
        subprocess.run([args.twin, "-m", "pip", "install", "--quiet", "--dry-run", "--only-binary=:all:", "--report",
                        str(report_file), *packages], check=True)
        pins = needed(json.loads(report_file.read_text()))
    print(f"{len(pins)} packages the twin lacks: " + ", ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "--dest", str(args.dest),
                    *(f"{n}=={v}" for n, v in sorted(pins.items()))], check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the twin's packages and the wheels only
    with tempfile.TemporaryDirectory() as site:
        subprocess.run(install_command(args.twin, args.dest, Path(site)), check=True)
        missing = missing_modules(args.twin, STUDY_PACKAGES, with_site(clean_env, Path(site)))
    if missing:
        sys.exit(f"error: with the wheels installed the twin still cannot import {', '.join(missing)}")
    wheel_bytes, tree_bytes = sum(w.stat().st_size for w in wheels), carried_tree_bytes()
    total = wheel_bytes + tree_bytes
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels {wheel_bytes / 2**20:.1f} MiB + working tree {tree_bytes / 2**20:.1f} MiB = "
          f"{total / 2**20:.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a call may carry; they import in the twin")
    if total > CARRY_LIMIT:
        sys.exit(f"error: {total / 2**20:.1f} MiB is over the {CARRY_LIMIT / 2**20:.0f} MiB a call may carry")


if __name__ == "__main__":
    main()
