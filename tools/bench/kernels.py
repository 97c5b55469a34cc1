"""Compile every Triton kernel of the project for a GPU architecture, on a machine without a GPU, and
estimate its time on an H200 from the compiled code.

Each kernel is compiled with the arguments it gets at run time (the Mamba mixer's tensor layouts at the
DiM-L/2 and ZigMa-B/2 layer shapes, in float32 and bfloat16), specialised the way Triton's launcher
specialises them (integers equal to 1 become constants, multiples of 16 and tensors are marked
16-divisible). ptxas then reports registers, spill bytes and the launch's shared memory.

The static cost model (sm_90 only). nvdisasm (shipped with triton) disassembles the cubin; every
backward branch closes a loop, and each loop's own instructions (those not in a loop nested inside it)
are counted by kind: all, shuffles (SHFL), barriers (BAR), shared-memory loads and stores (LDS, STS,
LDSM, ATOMS), special-function ops (MUFU), global loads and stores. Loop depth d runs the trip count of
the kernel's d-th loop (:func:`loop_trips`: chunks of L, then states where N is a run-time loop) at the
layer's shape, batch 32; straight-line code runs once per program. Per program and warp that gives the
instructions issued, the shuffles plus shared-memory operations, and the HBM bytes are the kernel's
tensor arguments, each read or written once, plus the copies made to align rows (the launch's
``copied_bytes``). With an H200's

    SMS = 132, CLOCK = 1.98e9 Hz, ISSUE = 4 warp-instructions per SM per clock (4 schedulers),
    SHARED = 1 shuffle or shared-memory warp-operation per SM per clock, HBM = 4.8e12 bytes/s,

the estimate is the largest of: instructions / (SMS * ISSUE * CLOCK), shuffles and shared-memory
operations / (SMS * SHARED * CLOCK), bytes / HBM; the two issue bounds are scaled by the occupancy the
registers allow: the grid runs in waves of SMS * (programs resident per SM) programs (65,536 registers
and 64 warps per SM, allocated per warp in units of 256 registers; 228 KiB shared memory). The roofline
is the same problem at the hardware's limits: the tensor arguments' bytes, one exp per (element, state)
(MUFU: 16 per SM per clock) and FWD_FLOPS / BWD_FLOPS fp32 operations per (element, state) at 128 per
SM per clock.

Limits: latency is not in the model (a kernel with few warps per SM, or waiting on memory, runs
slower than its estimate); neither are L1/L2 sector counts (strided or uncoalesced accesses cost no
more than contiguous ones here), branch divergence, the loop code placed outside the branch range by
the compiler, nor the tails of loops: every chunk costs a full chunk.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import tempfile

import torch

from ssm_tread.ops import triton_scan

# (label, E, L): Mamba mixer layers, E = 2 * hidden size, N = 16
LAYERS = (("DiM-L/2", 2048, 366), ("ZigMa-B/2", 1536, 256))
STATE = 16
BATCH = 32  # per GPU, for the trip counts and bytes of the estimate
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# H200 (sm_90): see the module docstring
SMS, CLOCK, ISSUE, SHARED, HBM = 132, 1.98e9, 4, 1, 4.8e12
REGISTERS, MAX_WARPS, MAX_PROGRAMS, SHARED_BYTES = 65536, 64, 32, 228 * 1024
MUFU_RATE, FMA_RATE = 16, 128  # per SM per clock
FWD_FLOPS, BWD_FLOPS = 4, 13  # fp32 ops per (element, state): dt A, dt u B, h, y; and the backward's
KINDS = {"shuffles": ("SHFL",), "barriers": ("BAR",), "shared": ("LDS", "STS", "LDSM", "ATOMS"), "sfu": ("MUFU",),
         "global": ("LDG", "STG", "RED", "ATOMG")}


def mixer_inputs(channels: int, length: int, dtype: torch.dtype, batch: int = 2, device="cpu") -> dict:
    """Scan inputs laid out as :class:`ssm_tread.models.mamba.Mamba` passes them: u from the causal
    conv (contiguous), dt and z as [b, E, L] views of [b, L, *] projections, contiguous B and C, A, D
    and delta_bias in float32."""
    x_and_z = torch.zeros(batch, length, 2 * channels, dtype=dtype, device=device).transpose(1, 2)
    return dict(
        u=torch.zeros(batch, channels, length, dtype=dtype, device=device),
        delta=torch.zeros(batch, length, channels, dtype=dtype, device=device).transpose(1, 2),
        A=torch.zeros(channels, STATE, device=device),
        B=torch.zeros(batch, 1, STATE, length, dtype=dtype, device=device),
        C=torch.zeros(batch, 1, STATE, length, dtype=dtype, device=device),
        D=torch.zeros(channels, device=device),
        z=x_and_z[:, channels:],
        delta_bias=torch.zeros(channels, device=device),
    )


def scan_launches(channels: int, length: int, dtype: torch.dtype, mixer: bool = True, batch: int = 2,
                  device="cpu") -> list:
    """[(kernel, launch)] of one scan, forward and backward: as the mixer calls it (D, z, delta_bias,
    softplus; no gradient for the last state), or with ``mixer=False`` the bare recurrence with a
    gradient for the last state. On the meta device nothing is allocated (for the cost model)."""
    forward_kernel, backward_kernel = triton_scan.scan_kernels()
    x = mixer_inputs(channels, length, dtype, batch, device)
    if not mixer:
        x.update(D=None, z=None, delta_bias=None)
    forward, (y, states, last) = triton_scan.forward_launch(**x, softplus=mixer)
    grad_last = None if mixer else torch.zeros_like(last)
    backward, _ = triton_scan.backward_launch(forward, **x, states=states, grad_y=torch.zeros_like(y),
                                              grad_last=grad_last)
    return [(forward_kernel, forward), (backward_kernel, backward)]


def specialise(kernel, launch) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) for ``triton.compile``, as the launcher builds them."""
    signature, constants, attrs = {}, dict(launch.constants), {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, launch.args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in launch.constants:
        signature[name] = "constexpr"
    return signature, constants, attrs


def compile_with_usage(source, arch: int, options: dict):
    """``triton.compile`` into an empty cache (so that ptxas runs), with ptxas's own ``-v`` log parsed
    into (compiled kernel, registers, spill bytes stored + loaded)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        with knobs.cache.scope(), knobs.nvidia.scope():
            knobs.cache.dir = cache
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return compiled, registers, spills


def sass(cubin: bytes) -> str:
    """The cubin's SASS, by the nvdisasm that ships with triton."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        result = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True,
                                check=True)
    return result.stdout


def sass_loops(text: str) -> tuple[dict, list[dict]]:
    """(counts of the straight-line code, [counts of each loop's own instructions, with its depth]).
    A loop is the code from a label to a branch back to it; counts are by kind (see KINDS)."""
    labels, code = {}, []  # label -> index of the next instruction; [(opcode, branch target)]
    for line in text.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(code)
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if instruction:
            target = re.search(r"`\((\.L_x_\d+)\)", instruction.group(2))
            code.append((instruction.group(1), target.group(1) if target else None))
    spans = sorted({(labels[target], i) for i, (op, target) in enumerate(code)
                    if op.startswith("BRA") and target is not None and labels[target] < i})
    spans = [(a, b) for a, b in spans if b > a]  # a branch to itself is the trap after EXIT
    owner = [None] * len(code)  # the innermost loop of each instruction
    for k, (a, b) in sorted(enumerate(spans), key=lambda item: item[1][1] - item[1][0], reverse=True):
        for i in range(a, b + 1):
            owner[i] = k

    def count(indices):
        ops = [code[i][0] for i in indices]
        counts = {"all": len(ops)}
        for kind, prefixes in KINDS.items():
            counts[kind] = sum(op.split(".")[0] in prefixes for op in ops)
        return counts

    loops = []
    for k, (a, b) in enumerate(spans):
        depth = sum(a2 <= a and b <= b2 for a2, b2 in spans)
        loops.append(dict(depth=depth, **count([i for i in range(len(code)) if owner[i] == k])))
    return count([i for i in range(len(code)) if owner[i] is None]), loops


def loop_trips(launch, length: int) -> list[int]:
    """Trip counts of a scan kernel's loops by depth: the chunks of L, then the N states where N is a
    run-time loop."""
    trips = [-(-length // launch.constants["CHUNK"])]
    if "N" not in launch.constants:
        trips.append(launch.args[2].shape[1])  # A [E, N]
    return trips


def occupancy(registers: int, shared: int, warps: int) -> int:
    """Programs resident per SM."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    limits = [REGISTERS // (per_warp * warps), MAX_WARPS // warps, MAX_PROGRAMS]
    if shared:
        limits.append(SHARED_BYTES // (shared + 1024))
    return min(limits)


def tensor_bytes(launch) -> int:
    """Bytes of the launch's distinct tensor arguments (placeholders for absent tensors repeat one)."""
    tensors = {id(a): a for a in launch.args if isinstance(a, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def estimate(kernel, launch, compiled, registers: int, length: int) -> dict:
    """The static cost model's numbers for one launch (see the module docstring): microseconds."""
    straight, loops = sass_loops(sass(compiled.asm["cubin"]))
    trips = loop_trips(launch, length)
    if any(loop["depth"] > len(trips) for loop in loops) or len({loop["depth"] for loop in loops}) < len(loops):
        raise RuntimeError(f"{kernel.fn.__name__}: loops {loops} do not match the model's trip counts {trips}")
    per_program = {}  # per warp
    for kind in straight:
        total = straight[kind]
        for loop in loops:
            total += loop[kind] * math.prod(trips[:loop["depth"]])
        per_program[kind] = total
    warps = launch.options["num_warps"]
    programs = math.prod(launch.grid)
    resident = occupancy(registers, compiled.metadata.shared, warps)
    waves = math.ceil(programs / (SMS * resident))
    per_sm = {kind: waves * resident * warps * n for kind, n in per_program.items()}  # the busiest SM
    bytes_ = tensor_bytes(launch)
    bounds = dict(
        issue=per_sm["all"] / (ISSUE * CLOCK),
        shared=(per_sm["shuffles"] + per_sm["shared"]) / (SHARED * CLOCK),
        hbm=(bytes_ + launch.copied_bytes) / HBM,
    )
    batch, channels = launch.args[0].shape[:2]
    element_states = batch * channels * length * STATE
    flops = BWD_FLOPS if "bwd" in kernel.fn.__name__ else FWD_FLOPS
    roofline = max(bytes_ / HBM, element_states / (SMS * MUFU_RATE * CLOCK),
                   flops * element_states / (SMS * FMA_RATE * CLOCK))
    return dict(
        est_us=round(1e6 * max(bounds.values()), 1), roofline_us=round(1e6 * roofline, 1),
        bound=max(bounds, key=bounds.get), bounds_us={k: round(1e6 * v, 1) for k, v in bounds.items()},
        programs_per_sm=resident, hbm_mb=round((bytes_ + launch.copied_bytes) / 1e6, 1),
        loops=[dict(loop, trips=trips[loop["depth"] - 1]) for loop in loops],
    )


def compile_one(kernel, launch, arch: int) -> tuple:
    from triton.compiler import ASTSource

    signature, constants, attrs = specialise(kernel, launch)
    return compile_with_usage(ASTSource(kernel, signature, constants, attrs), arch, launch.options)


def layer_estimate(layer, dtype: torch.dtype, direction: str, batch: int = BATCH) -> dict:
    """{"est_us", "roofline_us", ...} of the forward or backward kernel for one mixer layer on an
    H200: ``layer`` is a label of LAYERS ("DiM-L/2") or (E, L). Compiles the kernel (seconds)."""
    channels, length = dict((label, (e, l)) for label, e, l in LAYERS)[layer] if isinstance(layer, str) else layer
    kernel, launch = scan_launches(channels, length, dtype, batch=batch, device="meta")[
        ("forward", "backward").index(direction)]
    compiled, registers, _ = compile_one(kernel, launch, 90)
    return estimate(kernel, launch, compiled, registers, length)


def compile_kernels(arch: int, progress=print) -> list[dict]:
    """Compile every kernel at every run-time configuration for sm_``arch``; one result dict each, with
    the cost model's estimate for an H200 at batch 32 where ``arch`` is 90 (None otherwise)."""
    if triton_scan.interpreted():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile kernels (the interpreter has no compiler)")
    runs = [(f"{label} layer E={channels} L={length}, {DTYPES[dtype]}", length,
             scan_launches(channels, length, dtype, batch=BATCH, device="meta"))
            for label, channels, length in LAYERS for dtype in (torch.float32, torch.bfloat16)]
    runs.append(("bare scan (no D, z, delta_bias, softplus; last-state gradient) E=2048 L=366, fp32", 366,
                 scan_launches(2048, 366, torch.float32, mixer=False, batch=BATCH, device="meta")))
    results = []
    for label, length, launches in runs:
        for kernel, launch in launches:
            compiled, registers, spills = compile_one(kernel, launch, arch)
            blocks = " ".join(f"{k}={launch.constants[k]}" for k in ("BLOCK_E", "CHUNK") if k in launch.constants)
            options = " ".join(f"{k}={v}" for k, v in launch.options.items())
            result = dict(kernel=kernel.fn.__name__, config=f"{label}, {blocks}, {options}", registers=registers,
                          spills=spills, shared=compiled.metadata.shared)
            result.update(estimate(kernel, launch, compiled, registers, length) if arch == 90 else
                          dict(est_us=None, roofline_us=None))
            progress(f"compiled {result['kernel']} for sm_{arch}: {result['config']}")
            results.append(result)
    return results


def kernel_table(results: list[dict], arch: int) -> str:
    rows = [
        f"Triton kernels compiled for sm_{arch} (registers per thread, spill bytes, shared memory bytes); "
        f"estimated and roofline time of one layer at batch {BATCH} on an H200 (microseconds)",
        "",
        "| kernel | config | registers | spills | shared | loop instructions (shuffles, barriers) | est_us | "
        "roofline_us |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        loops = "; ".join(f"depth {loop['depth']} x{loop['trips']}: {loop['all']} ({loop['shuffles']}, "
                          f"{loop['barriers']})" for loop in r.get("loops", []))
        rows.append(f"| {r['kernel']} | {r['config']} | {r['registers']} | {r['spills']} | {r['shared']} | {loops} | "
                    f"{r['est_us']} | {r['roofline_us']} |")
    return "\n".join(rows)


def write_json(results: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
