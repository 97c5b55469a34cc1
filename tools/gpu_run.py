"""One command for a GPU session: the GPU check, then the MNIST study seed by seed, inside one time budget,
with everything measured written under one folder as it comes.

    python tools/gpu_run.py $OUT                     # on the GPU machine, one call of at most 10 minutes
    python tools/gpu_run.py /tmp/gpu_run --dry-run   # the same code on a CPU at toy sizes

What it does, in order, stopping each step at its share of ``--budget-s`` (570 s) so that the whole
command ends inside a 600 s limit with its results written:

  1. packages: the study's trainer needs accelerate, Pillow, matplotlib and tqdm beyond torch, triton,
     numpy and einops. Where one of them does not import, the wheels in ``--wheels`` (made here by
     ``tools/gpu_wheels.py``) are installed offline into ``--site`` and put on the PYTHONPATH of every
     later step; where all import, nothing is installed.
  2. ``tools/gpu_check.py --budget-s CHECK`` (``--check-budget-s``, 210 s), which rewrites
     OUT/gpu_check.json and OUT/gpu_check.md after every part.
  3. ``tools/benchmark.py study configs/study_mnist.py --seeds S --workers 9`` for one seed after the
     other (a dry run: the first seed at toy size, as the study's own dry run). A seed starts only while
     the time left is more than the longest seed so far took (a run cut short is lost: the study keeps no
     checkpoints inside a run); a seed that runs out of time is stopped with its training processes, and
     the report is then made from the runs that finished (``--report-only``).

After each seed: OUT/study.md and OUT/study.json (the study's tables and data of every finished run), and
OUT/study_runs.tar.gz, the run folders without their checkpoints (metrics.jsonl, eval.json, config.json,
train.log, sample grids) with the report's folder (study.md, study.json and the figures
study_mnist_{steps,wallclock,cputime}.png, for docs/results/study_mnist/ and docs/figures/).
OUT/gpu_run.log holds every step's output. These are 6 files, within the 8 a device call returns.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the study's trainer imports beyond torch, triton, numpy and einops: import name -> PyPI name
STUDY_PACKAGES = {"accelerate": "accelerate", "PIL": "pillow", "matplotlib": "matplotlib", "tqdm": "tqdm"}
# prints each module named on its command line that does not import
IMPORT_CHECK = ("import importlib, sys\nfor name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
                "    except Exception:\n        print(name)\n")
REPORT_RESERVE_S = 40  # kept back from the study for the report and the archive after a seed is cut
STOP_GRACE_S = 10  # a stopped step's processes get this long after SIGTERM before SIGKILL


def missing_modules(python: str, modules, env=None) -> list[str]:
    """The modules that ``python`` (with ``env``) cannot import."""
    done = subprocess.run([python, "-c", IMPORT_CHECK, *modules], env=env, capture_output=True, text=True,
                          check=False)
    return done.stdout.split() if done.returncode == 0 else list(modules)


def install_command(python: str, wheels: Path, site: Path) -> list[str]:
    """pip, offline, the wheels of ``wheels`` as they are (no resolving) into the folder ``site``."""
    return [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", str(site), *sorted(str(w) for w in wheels.glob("*.whl"))]


def with_site(env: dict, site: Path) -> dict:
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)}


def pack_runs(runs: Path, archive: Path) -> int:
    """``runs`` without checkpoints into the tar.gz ``archive`` (replaced whole, never left half written);
    its size in bytes."""
    def keep(member):
        return None if "checkpoints" in Path(member.name).parts or member.name.endswith(".lock") else member

    part = archive.with_name(archive.name + ".part")
    with tarfile.open(part, "w:gz") as tar:
        tar.add(runs, arcname=runs.name, filter=keep)
    os.replace(part, archive)
    return archive.stat().st_size


class Session:
    """The time budget and the log: every step's output goes to the terminal and to OUT/gpu_run.log."""

    def __init__(self, out: Path, budget_s: float):
        self.start, self.budget_s, self.log = time.monotonic(), budget_s, out / "gpu_run.log"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def say(self, line: str):
        line = f"[gpu_run {time.monotonic() - self.start:5.0f} s] {line}"
        print(line, flush=True)
        with open(self.log, "a") as log:
            log.write(line + "\n")

    def run(self, cmd: list[str], limit_s: float, env: dict) -> tuple[int | None, float]:
        """Run ``cmd`` in its own process group for at most ``limit_s``; (exit code, or None if it was
        stopped at the limit with every process it started; seconds)."""
        self.say(f"$ {shlex.join(cmd)}   (at most {limit_s:.0f} s)")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def tee():
            with open(self.log, "a", buffering=1) as log:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
        seconds = time.monotonic() - start
        reader.join(timeout=STOP_GRACE_S)
        self.say(f"{'stopped at its limit' if code is None else f'exit code {code}'} after {seconds:.0f} s")
        return code, seconds


def install_packages(session: Session, args, env: dict) -> dict:
    """Step 1: the environment every later step runs with (the carried wheels on its path where needed)."""
    missing = missing_modules(args.python, STUDY_PACKAGES, env)
    if not missing:
        session.say(f"packages: {', '.join(STUDY_PACKAGES)} import here; nothing installed")
        return env
    wheels = sorted(args.wheels.glob("*.whl"))
    session.say(f"packages: {', '.join(missing)} missing; installing the {len(wheels)} wheels of {args.wheels} "
                f"into {args.site}")
    if not wheels:
        session.say(f"packages: no wheels in {args.wheels}; make them with tools/gpu_wheels.py and carry that folder")
        return env
    session.run(install_command(args.python, args.wheels, args.site), session.left(), env)
    env = with_site(env, args.site)
    still = missing_modules(args.python, STUDY_PACKAGES, env)
    session.say(f"packages: {', '.join(still)} still missing: the study will fail" if still else
                "packages: all import")
    return env


def run_study(session: Session, args, env: dict, seeds: list[int]):
    """Step 3: the study one seed at a time, then its report and archive under OUT."""
    name = Path(args.config).stem
    runs = args.runs or ROOT / "runs" / (f"{name}-dry-run" if args.dry_run else name)
    report = runs / "report"
    study = [args.python, "tools/benchmark.py", "study", args.config, "--workers", str(args.workers), "--runs",
             str(runs), "--out", str(report), "--plot-prefix", str(report / name)]
    study += ["--dry-run"] * args.dry_run
    study += [*(["--backbones", *args.backbones] if args.backbones else []),
              *(["--modes", *args.modes] if args.modes else [])]
    longest, cut = 0.0, False
    for seed in seeds:
        left = session.left() - REPORT_RESERVE_S
        if left <= longest:
            took = f", and a seed took {longest:.0f} s" if longest else ""
            session.say(f"study: seed {seed} not started: {max(left, 0):.0f} s left{took}")
            break
        code, seconds = session.run(study + ["--seeds", str(seed)], left, env)
        longest = max(longest, seconds)
        if code is None:
            cut = True
            session.run(study + ["--report-only"], max(session.left(), 30), env)
        collect(session, runs, report, args.out)
        if cut:
            break


def collect(session: Session, runs: Path, report: Path, out: Path):
    for name in ("study.md", "study.json"):
        if (report / name).is_file():
            shutil.copyfile(report / name, out / name)
    if runs.is_dir():
        size = pack_runs(runs, out / "study_runs.tar.gz")
        session.say(f"study: {out / 'study_runs.tar.gz'} ({size / 2**20:.1f} MiB)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for everything measured (on the GPU machine: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on a CPU at toy sizes")
    p.add_argument("--budget-s", type=float, default=570, help="the whole command's time (default 570)")
    p.add_argument("--check-budget-s", type=float, default=210, help="the GPU check's share (default 210)")
    p.add_argument("--parts", nargs="+", choices=["check", "study"], default=["check", "study"])
    p.add_argument("--config", default="configs/study_mnist.py", help="the study config")
    p.add_argument("--seeds", nargs="+", type=int, help="in this order (default: the config's; a dry run: its first)")
    p.add_argument("--backbones", nargs="+", help="the study's backbones (default: all)")
    p.add_argument("--modes", nargs="+", help="the study's modes (default: all)")
    p.add_argument("--workers", type=int, default=9, help="study runs at a time (default 9)")
    p.add_argument("--runs", type=Path, help="run folders (default: runs/<config name>, a dry run: ...-dry-run)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels (default .whl)")
    p.add_argument("--site", type=Path, default=Path("/tmp/ssm_tread_site"),
                   help="where missing packages are installed (default /tmp/ssm_tread_site)")
    p.add_argument("--python", default=sys.executable, help="the interpreter every step runs with")
    args = p.parse_args(argv)
    args.out, args.wheels, args.site = args.out.resolve(), args.wheels.resolve(), args.site.resolve()
    args.runs = args.runs and args.runs.resolve()
    if args.budget_s <= REPORT_RESERVE_S or args.check_budget_s <= 0:
        p.error(f"--budget-s must exceed {REPORT_RESERVE_S} and --check-budget-s be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, args.budget_s)
    session.say(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}: python tools/gpu_run.py "
                f"{shlex.join(sys.argv[1:] if argv is None else argv)}; budget {args.budget_s:.0f} s")
    env = install_packages(session, args, {**os.environ, "PYTHONUNBUFFERED": "1"})
    if "check" in args.parts:
        check = [args.python, "tools/gpu_check.py", "--out", str(args.out), "--budget-s", str(args.check_budget_s)]
        session.run(check + ["--dry-run"] * args.dry_run, min(args.check_budget_s + 60, session.left()), env)
    if "study" in args.parts:
        seeds = args.seeds
        if seeds is None:
            sys.path.insert(0, str(ROOT))
            from ssm_tread.train.config import load_config

            seeds = list(load_config(str(ROOT / args.config))["_study"]["seeds"])[:1 if args.dry_run else None]
        run_study(session, args, env, seeds)
    session.say(f"done, {session.left():.0f} s of the budget left; everything is under {args.out}")


if __name__ == "__main__":
    main()
