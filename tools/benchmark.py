"""Benchmarks.

    python tools/benchmark.py scan        # selective-scan backends side by side: batch 2, E=768, N=16, L=256
    python tools/benchmark.py scan --backends torch mamba_ssm --batch 8 --channels 2048 --length 1024 --device cuda

    # training steps with and without TREAD, interleaved; Markdown + JSON + plot (and the router's overhead)
    python tools/benchmark.py step --configs dit-b2 zigma-s2 dim-s2 --threads 1 --repeats 5 --peak-tflops measure \\
        --out docs/results/bench_step_cpu --plot docs/figures/bench_step_cpu.png
    python tools/benchmark.py step --configs "model=DiT-S/2,batch=8" --device cuda --precision bf16 --peak-tflops 989

    # the router's own cost (selection + gather + scatter + restricted scan orders) as a share of a step
    python tools/benchmark.py router --configs dit-b2 zigma-s2 dim-s2 --threads 1

    # where the time goes: operator self time of one step per mode (torch.profiler)
    python tools/benchmark.py profile --configs zigma-s2 --threads 1 --out docs/results/bench_profile_cpu

    # a convergence study: one tools/train.py run per backbone x mode x seed (resumable), then its table
    # and plots from the runs' metrics (docs/results/<config name>/, docs/figures/<config name>_*.png)
    python tools/benchmark.py study configs/study_digits.py --workers 2
    python tools/benchmark.py study configs/study_digits.py --seeds 0 --backbones DiM
    python tools/benchmark.py study configs/study_digits.py --report-only
    python tools/benchmark.py study configs/study_mnist.py --workers 9     # on a GPU: the 16x16-token study
    python tools/benchmark.py study configs/study_mnist.py --dry-run       # the same at toy size, CPU, ~1 min

    # what a study's scans read inside its route, without training: the grid distance between consecutively
    # read image tokens, the share of fixed tokens, the distinct orders (no routing / scan-consistent / naive)
    python tools/benchmark.py gaps configs/study_digits_1500.py

    # planning table: per preset at 256 and 512, parameters, forward GMACs with and without TREAD, activation
    # memory per sample in bf16, the analytic speedup; counted on the meta device (seconds, no GPU, no weights)
    python tools/benchmark.py plan --out docs/results/plan

    # compile every Triton kernel for sm_90 (no GPU needed): registers, spills, shared memory per config,
    # and the static SASS cost model: per-loop instruction counts, est_us and roofline_us on an H200, batch 32
    python tools/benchmark.py kernels --arch 90 --json docs/results/kernels_sm90.json

A step config is a preset (dit-b2, zigma-s2, dim-s2, dit-tiny, zigma-tiny, dim-tiny) or key=value pairs:
model=NAME (create_model), batch=N, route=START:END:RATIO (";" between routes; default 2 -> depth-4 at 0.5),
objective=ddpm|flow, precision=fp32|bf16, label=TEXT, and any model override (hidden_size=384, depth=25, ...);
see tools/bench/specs.py. The rest of the trainer config (optimizer, EMA) is configs/base.py's.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssm_tread.ops import BACKENDS  # noqa: E402
from tools.bench.scan import benchmark_scan, scan_table  # noqa: E402


def scan(args):
    times = benchmark_scan(
        args.batch, args.channels, args.state, args.length, args.backends, args.device, args.warmup, args.repeats
    )
    shape = f"batch {args.batch}, E={args.channels}, N={args.state}, L={args.length}"
    print(f"selective scan, forward + backward, {shape}, {args.device}, median of {args.repeats}\n")
    print(scan_table(times))


def _setup_threads(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _configs(args):
    from tools.bench.specs import parse_spec

    configs = [parse_spec(spec) for spec in args.configs]
    for cfg in configs:
        if args.batch:
            cfg["train"]["batch_size"] = args.batch
        if args.precision:
            cfg["train"]["precision"] = args.precision
    return configs


def step(args):
    import torch

    from tools.bench.env import environment, measure_matmul_tflops
    from tools.bench.report import markdown_table, write_outputs
    from tools.bench.router import router_overhead
    from tools.bench.step import benchmark_step, build_step

    _setup_threads(args)
    device = torch.device(args.device)
    peak = peak_cpu = None
    meta = environment(device)
    if args.peak_tflops == "measure":
        rates = measure_matmul_tflops(device, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
        peak, peak_cpu = rates["wall"], rates["cpu"]
        meta["peak_source"] = "measured: best dense matmul (2048^3) on this device with these threads"
        print(f"device peak for MFU: {peak:.4f} TFLOP/s wall-clock"
              + (f", {peak_cpu:.4f} TFLOP/s over CPU time" if peak_cpu else "") + " (measured matmul)")
    elif args.peak_tflops:
        peak = float(args.peak_tflops)
        meta["peak_source"] = "given on the command line"
    meta.update(peak_tflops=peak, peak_tflops_cpu=peak_cpu or peak)
    results = []
    for cfg in _configs(args):
        result = benchmark_step(cfg, device, warmup=args.warmup, repeats=args.repeats, peak_tflops=peak, log=print,
                                peak_tflops_cpu=peak_cpu)
        if not args.no_router:
            result["router"] = router_overhead(build_step(cfg, device), result["tread"]["step_time_s"]["median"],
                                               repeats=args.router_repeats,
                                               routed_step_cpu_s=result["tread"]["cpu_time_s"]["median"])
            print(f"  router overhead {100 * result['router']['overhead_share']:.2f}% of the routed step "
                  f"(cpu time {100 * result['router'].get('overhead_share_cpu', float('nan')):.2f}%)")
        results.append(result)
        if args.out:
            write_outputs(results, meta, args.out, args.plot)
    print()
    print(markdown_table(results))
    if args.out:
        print(f"wrote {args.out}.json, {args.out}.md" + (f", {args.plot}" if args.plot else ""))


def _report(args, title, device, results, text):
    from tools.bench.env import environment, write_report

    print(text)
    if args.out:
        paths = write_report(args.out, title, environment(device), results, text)
        print(f"wrote {paths['json']}, {paths['md']}")


def router(args):
    import torch

    from tools.bench.router import benchmark_router, router_table

    _setup_threads(args)
    device = torch.device(args.device)
    results = [benchmark_router(cfg, device, steps=args.steps, repeats=args.repeats, log=print)
               for cfg in _configs(args)]
    _report(args, "Router overhead", device, results, router_table(results))


def profile(args):
    import torch

    from tools.bench.profile import profile_step, profile_table

    _setup_threads(args)
    device = torch.device(args.device)
    results = [profile_step(cfg, device, top=args.top, rounds=args.rounds) for cfg in _configs(args)]
    _report(args, "Step profile", device, results, "\n".join(profile_table(r) for r in results))


def study(args):
    import json
    from pathlib import Path

    import torch

    from ssm_tread.train.config import load_config
    from tools.bench import study_report as report
    from tools.bench.env import environment
    from tools.bench.study import grid, run_study

    name = Path(args.config).stem
    meta = {**environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")), "config_file": args.config}
    if args.report_only:
        args.seeds = []
    runs = args.runs or (f"runs/{name}-dry-run" if args.dry_run else f"runs/{name}")
    data = run_study(args.config, runs, args.workers, args.backbones, args.modes, args.seeds, meta, args.dry_run)
    out = Path(args.out or (Path(runs) / "report" if args.dry_run else f"docs/results/{name}"))
    plot_prefix = args.plot_prefix or (f"{out}/{name}" if args.dry_run else f"docs/figures/{name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(data['runs'])} of {len(grid(load_config(args.config)))} runs in {out / 'study.json'}")
    if not data["runs"]:
        return
    table = report.markdown_table(data)
    title = f"Convergence study {name}{' (dry run: toy sizes)' if args.dry_run else ''}, {meta['date']}"
    (out / "study.md").write_text(f"{title}\n\nCommand: `{meta['command']}`\n\n" + table)
    print(table)
    for x, axis in (("step", "steps"), ("compute", "compute"), ("train_wall_s", "wallclock"), ("train_cpu_s", "cputime")):
        report.plot_study(data, f"{plot_prefix}_{axis}.png", x=x)
    print(f"wrote {out / 'study.md'}, {plot_prefix}_{{steps,compute,wallclock,cputime}}.png")


def gaps(args):
    from ssm_tread.train.config import load_config
    from ssm_tread.train.trainer import build_dataset_from
    from tools.bench.scan_gaps import gaps_table, scan_gaps

    cfg = load_config(args.config)
    print(gaps_table(scan_gaps(cfg, build_dataset_from(cfg), samples=args.samples)))


def kernels(args):
    from tools.bench.kernels import compile_kernels, kernel_table, write_json

    results = compile_kernels(args.arch)
    print(kernel_table(results, args.arch))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")


def plan(args):
    import json
    from dataclasses import asdict

    from tools.bench.plan import PLAN_CONFIGS, plan_row, plan_table

    configs = args.configs or PLAN_CONFIGS
    rows = [plan_row(config, resolution) for config in configs for resolution in args.resolutions]
    table = plan_table(rows)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(f"{args.out}.md", "w") as f:
            f.write(table + "\n")
        with open(f"{args.out}.json", "w") as f:
            json.dump([{**asdict(r), "speedup": r.speedup, "training_state": r.training_state} for r in rows], f,
                      indent=1)
        print(f"wrote {args.out}.md and {args.out}.json")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan", help="time the selective-scan backends side by side (forward + backward)")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--channels", type=int, default=768, help="E, the mixer's inner width")
    s.add_argument("--state", type=int, default=16, help="N")
    s.add_argument("--length", type=int, default=256, help="L")
    s.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: every backend usable on the device")
    s.add_argument("--device", default="cpu")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--repeats", type=int, default=5)
    s.set_defaults(run=scan)

    def common(parser):
        parser.add_argument("--configs", nargs="+", default=["dit-b2", "zigma-s2", "dim-s2"],
                            help="presets or key=value specs (see above)")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        parser.add_argument("--batch", type=int, default=0, help="override every config's batch size")
        parser.add_argument("--precision", choices=["fp32", "bf16"], help="override every config's precision")

    s = sub.add_parser("step", help="training steps with and without TREAD, interleaved")
    common(s)
    s.add_argument("--warmup", type=int, default=2, help="untimed steps of each mode first")
    s.add_argument("--repeats", type=int, default=5, help="timed pairs (A B B A ...)")
    s.add_argument("--peak-tflops", default=None, help="device peak for MFU: a number, or 'measure' (dense matmul)")
    s.add_argument("--no-router", action="store_true", help="skip the router-overhead measurement")
    s.add_argument("--router-repeats", type=int, default=20)
    s.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.md")
    s.add_argument("--plot", default=None, help="plot file (png)")
    s.set_defaults(run=step)

    s = sub.add_parser("router", help="the router's own cost as a share of a routed training step")
    common(s)
    s.add_argument("--steps", type=int, default=3, help="routed training steps timed for the comparison")
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.md")
    s.set_defaults(run=router)

    s = sub.add_parser("profile", help="operator self time of one step with and without TREAD (torch.profiler)")
    common(s)
    s.add_argument("--top", type=int, default=15, help="operators listed")
    s.add_argument("--rounds", type=int, default=3, help="profiled steps per mode (A B interleaved); median per op")
    s.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.md")
    s.set_defaults(run=profile)

    s = sub.add_parser("study", help="a convergence study: train its runs (resumable), then table and plots")
    s.add_argument("config", help="a study config file (a trainer config with study = dict(...)), "
                                  "e.g. configs/study_digits.py")
    s.add_argument("--runs", default=None, help="run directories go here (default: runs/<config name>, a dry run "
                                                "runs/<config name>-dry-run)")
    s.add_argument("--out", default=None, help="directory for study.json and study.md (default: docs/results/<config "
                                               "name>, a dry run <runs>/report)")
    s.add_argument("--workers", type=int, default=1, help="training runs at a time")
    s.add_argument("--backbones", nargs="+", help="train only these backbones (default: all)")
    s.add_argument("--modes", nargs="+", help="train only these modes: none, scan, naive (default: all)")
    s.add_argument("--seeds", nargs="+", type=int, help="train only these seeds (default: all)")
    s.add_argument("--report-only", action="store_true", help="train nothing: tables and plots of the finished runs")
    s.add_argument("--plot-prefix", default=None, help="default: docs/figures/<config name>, a dry run <out>/<config "
                                                       "name>")
    s.add_argument("--dry-run", action="store_true", help="the same runs at toy size, first seed only (CPU, seconds "
                                                          "a run): checks that the study will run")
    s.set_defaults(run=study)

    s = sub.add_parser("gaps", help="what the scans read inside a study's route, without training: grid distance "
                                    "between consecutive reads, fixed tokens, distinct orders")
    s.add_argument("config", help="a study config file, e.g. configs/study_digits_1500.py")
    s.add_argument("--samples", type=int, default=512, help="random token selections averaged over")
    s.set_defaults(run=gaps)

    s = sub.add_parser("plan", help="planning table at 256 and 512: params, GMACs, memory per sample (meta device)")
    s.add_argument("--configs", nargs="+", help="config names whose _tread.py variant gives the model and routes, "
                                                "e.g. dit_xl2 dim_h (default: every preset)")
    s.add_argument("--resolutions", nargs="+", type=int, default=[256, 512], choices=[256, 512])
    s.add_argument("--out", default=None, help="output prefix: writes PREFIX.md and PREFIX.json")
    s.set_defaults(run=plan)

    s = sub.add_parser("kernels", help="compile every Triton kernel for a GPU architecture: registers, spills, estimated H200 time")
    s.add_argument("--arch", type=int, choices=[80, 90], required=True, help="compute capability: 80 (A100), 90 (H100)")
    s.add_argument("--json", default=None, help="also write the results as a JSON list")
    s.set_defaults(run=kernels)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
