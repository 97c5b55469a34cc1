"""Triton kernels of the selective scan; :mod:`ssm_tread.ops.triton_scan` launches them and documents
the algorithm. Tensors are indexed [batch, channel, time] through strides; channel e = g * E_g + row.
"""

import triton
import triton.language as tl

LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): one MUFU.EX2, no range fix-up


@triton.jit
def affine(a1, b1, a2, b2):
    # the map h -> a1 h + b1 followed by h -> a2 h + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def softplus(x):
    """log(1 + e^x) to float32 precision at every x. log(1 + v) rounds 1 + v and so loses v's digits
    (all of them below x = -17); log(w) * v / (w - 1) with w = 1 + v cancels that rounding (Goldberg,
    "What every computer scientist should know about floating-point arithmetic", 1991)."""
    v = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + v
    rounded = w - 1.0  # v as 1 + v kept it: 0 when v < 2^-24, where log(1 + v) = v
    log1p = tl.where(rounded == 0.0, v, tl.log(w) * v / tl.where(rounded == 0.0, 1.0, rounded))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def load_dt(delta_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt (float32, 0 outside the sequence) and the raw value it came from."""
    return dt_of(tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32), bias, mask, HAS_BIAS, SOFTPLUS)


@triton.jit
def load_reversed(ptr, s_e, s_t, first, shift, L, rows, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """[BLOCK_E, CHUNK] float32 tile in reverse time order: step s holds time first + shift + CHUNK - 1 - s
    (0 past L, and in rows from ``rows`` on) of the rows at ``ptr``, ``s_e`` apart. Read as runs of 4
    steps forward in time, which Triton vectorises and lays out one run a thread, each turned around
    in registers (a load in reverse order is neither, and triton 3.6 laid it along channels). The
    runs are indexed [row and run, step]: with rows and runs as two dimensions of equal contiguity,
    triton 3.6 and 3.8 ordered the threads differently, and 3.6 ran w's scan in two layouts."""
    m = tl.arange(0, BLOCK_E * (CHUNK // 4))
    row = m // (CHUNK // 4)
    t = first + shift + 4 * (CHUNK // 4 - 1 - m % (CHUNK // 4))[:, None] + tl.arange(0, 4)[None, :]
    x = tl.load(ptr + row[:, None] * s_e + t * s_t, mask=(row < rows)[:, None] & (t < L), other=0.0)
    return tl.reshape(tl.flip(x.to(tl.float32), 1), (BLOCK_E, CHUNK))


@triton.jit
def dt_of(raw, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt (0 where ``mask`` is not set) from the loaded delta, and delta + bias."""
    if HAS_BIAS:
        raw += bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def reverse_steps(x, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """x [BLOCK_E, CHUNK] with its steps in reverse order: the runs of 4 steps (one a
    thread, the layout Triton gives the backward's [4, 32] tiles on one warp) swapped
    across lanes by a tl.gather, then each turned around in registers. A tl.gather of single steps
    puts one step on each lane, and the tiles it meets follow it there (a reduction along time then
    costs 5 rounds of shuffles a row instead of 3)."""
    backwards = CHUNK // 4 - 1 - tl.arange(0, CHUNK // 4)
    swapped = tl.gather(tl.reshape(x, (BLOCK_E, CHUNK // 4, 4)),
                        tl.broadcast_to(backwards[None, :, None], (BLOCK_E, CHUNK // 4, 4)), 1)
    return tl.reshape(tl.flip(swapped, 2), (BLOCK_E, CHUNK))


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,  # inputs
    y_ptr, states_ptr,  # outputs: y [b, E, L], states [b, chunks + 1, E, N] (the last is the last state)
    E, N, L, channels_per_group, B_groups_div, C_groups_div,
    s_ub, s_ue, s_ut, s_db, s_de, s_dt, s_zb, s_ze, s_zt,
    s_Bb, s_Bg, s_Bn, s_Bt, s_Cb, s_Cg, s_Cn, s_Ct,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < channels_per_group
    e = g * channels_per_group + rows  # [BLOCK_E] channel indices
    cols = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, CHUNK)
    bias = tl.load(bias_ptr + e, mask=row_ok, other=0.0).to(tl.float32) if HAS_BIAS else None
    D = tl.load(D_ptr + e, mask=row_ok, other=0.0).to(tl.float32) if HAS_D else None
    B_base = B_ptr + b * s_Bb + (g // B_groups_div) * s_Bg
    C_base = C_ptr + b * s_Cb + (g // C_groups_div) * s_Cg
    chunks = tl.cdiv(L, CHUNK)
    # the state entering chunk c is states[b, c]: h = 0 before the first; each chunk's scan writes the
    # state it leaves (its last column: steps past L are h -> h, as dt = 0 there) for the next to read
    states_base = states_ptr + b * (chunks + 1) * E * N
    tl.store(states_base + e[:, None] * N + cols[None, :], tl.zeros((BLOCK_E, BLOCK_N), tl.float32),
             mask=row_ok[:, None] & (cols[None, :] < N))
    tl.debug_barrier()
    for chunk in range(0, chunks):
        t = chunk * CHUNK + steps
        t_ok = t < L
        mask = row_ok[:, None] & t_ok[None, :]
        h0_ptrs = states_base + (chunk * E + e) * N  # [BLOCK_E] pointers to state 0
        dt, _ = load_dt(delta_ptr + b * s_db, bias, e[:, None] * s_de + t[None, :] * s_dt, mask, HAS_BIAS,
                        SOFTPLUS)
        u = tl.load(u_ptr + b * s_ub + e[:, None] * s_ue + t[None, :] * s_ut, mask=mask, other=0.0).to(tl.float32)
        dtu = dt * u
        y = tl.zeros((BLOCK_E, CHUNK), tl.float32)
        for n in range(0, N):
            A_n = tl.load(A_ptr + e * N + n, mask=row_ok, other=0.0).to(tl.float32)
            B_n = tl.load(B_base + n * s_Bn + t * s_Bt).to(tl.float32)  # rows padded with zeros to whole chunks
            C_n = tl.load(C_base + n * s_Cn + t * s_Ct).to(tl.float32)
            h0 = tl.load(h0_ptrs + n, mask=row_ok, other=0.0)
            a = tl.exp2(dt * (A_n * LOG2_E)[:, None])
            bu = dtu * B_n[None, :] + tl.where(steps[None, :] == 0, a * h0[:, None], 0.0)
            _, h = tl.associative_scan((a, bu), 1, affine)
            y += h * C_n[None, :]
            tl.store(h0_ptrs + E * N + n, tl.sum(tl.where(steps[None, :] == CHUNK - 1, h, 0.0), axis=1), mask=row_ok)
        tl.debug_barrier()  # the states just written are read by other threads in the next chunk
        if HAS_D:
            y += D[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + e[:, None] * s_ze + t[None, :] * s_zt, mask=mask, other=0.0)
            z = z.to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + (b * E + e[:, None]) * L + t[None, :], y, mask=mask)


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr,  # forward inputs, states
    dy_ptr, carry_ptr,  # dLoss/dy [b, E, L] (contiguous); [2, b, E, N] float32, [0] = dLoss/d(last state)
    du_ptr, ddelta_ptr, dz_ptr,  # [b, E, L] in the inputs' dtypes
    dA_ptr, dD_ptr, dbias_ptr,  # per batch element: [b, E, N], [b, E], [b, E] float32
    dB_ptr, dC_ptr,  # [b, G, N, L] float32, zeros on entry: every channel block adds its sums
    E, N, L, channels_per_group, B_groups_div, C_groups_div,
    s_ub, s_ue, s_ut, s_db, s_de, s_dt, s_zb, s_ze, s_zt,
    s_Bb, s_Bg, s_Bn, s_Bt, s_Cb, s_Cg, s_Cn, s_Ct,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    block = tl.program_id(2)
    rows = block * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < channels_per_group
    e = g * channels_per_group + rows
    steps = tl.arange(0, CHUNK)
    bias = tl.load(bias_ptr + e, mask=row_ok, other=0.0).to(tl.float32) if HAS_BIAS else None
    D = tl.load(D_ptr + e, mask=row_ok, other=0.0).to(tl.float32) if HAS_D else None
    B_base = B_ptr + b * s_Bb + (g // B_groups_div) * s_Bg
    C_base = C_ptr + b * s_Cb + (g // C_groups_div) * s_Cg
    grad_BC_row = (b * tl.num_programs(1) + g) * N  # row of dB, dC for n = 0
    chunks = tl.cdiv(L, CHUNK)
    # The states h come from a scan forward in time, dLoss/dh = w from one backward in time. Rather than
    # a reverse scan (which Triton lowers as flips, across lanes), everything but the forward scan is
    # computed on tiles in reverse time order (suffix _r, load_reversed), where w's scan runs forward
    # too; reverse_steps turns a_t h_{t-1} around. The carry a_{t0} w_{t0} of the chunk after (t0 its
    # first step), dLoss/dh at this chunk's end, is read from one half of carry_ptr and this chunk's
    # written to the other. B and C are loaded as [BLOCK_E, CHUNK] tiles (rows repeated) in the layout
    # of the tiles they meet: a row vector broadcast put them, and w's scan with them, one step a lane.
    grad_D = tl.zeros((BLOCK_E,), tl.float32)
    grad_bias = tl.zeros((BLOCK_E,), tl.float32)
    for i in range(0, chunks):
        chunk = chunks - 1 - i
        t = chunk * CHUNK + steps  # time order, for the states' scan
        t_ok = t < L
        mask = row_ok[:, None] & t_ok[None, :]
        dt, _ = load_dt(delta_ptr + b * s_db, bias, e[:, None] * s_de + t[None, :] * s_dt, mask, HAS_BIAS, SOFTPLUS)
        dtu = dt * tl.load(u_ptr + b * s_ub + e[:, None] * s_ue + t[None, :] * s_ut, mask=mask, other=0.0).to(tl.float32)
        dt_first = tl.sum(tl.where(steps[None, :] == 0, dt, 0.0), axis=1)  # [BLOCK_E] dt_{t0}
        r = chunk * CHUNK + CHUNK - 1 - steps  # reverse time order, for everything else
        r_ok = r < L
        mask_r = row_ok[:, None] & r_ok[None, :]
        first = chunk * CHUNK
        e0 = g * channels_per_group + block * BLOCK_E  # the block's first channel
        rows_left = channels_per_group - block * BLOCK_E
        delta_rows = delta_ptr + b * s_db + e0 * s_de
        u_rows = u_ptr + b * s_ub + e0 * s_ue
        dy_rows = dy_ptr + (b * E + e0) * L
        z_rows = z_ptr + b * s_zb + e0 * s_ze
        dt_r, _ = dt_of(load_reversed(delta_rows, s_de, s_dt, first, 0, L, rows_left, BLOCK_E, CHUNK), bias, mask_r,
                        HAS_BIAS, SOFTPLUS)
        dt_next_r, _ = dt_of(load_reversed(delta_rows, s_de, s_dt, first, 1, L, rows_left, BLOCK_E, CHUNK), bias,
                             row_ok[:, None] & (r + 1 < L)[None, :], HAS_BIAS, SOFTPLUS)
        dtu_r = dt_r * load_reversed(u_rows, s_ue, s_ut, first, 0, L, rows_left, BLOCK_E, CHUNK)
        dy_scan_r = load_reversed(dy_rows, L, 1, first, 0, L, rows_left, BLOCK_E, CHUNK)
        if HAS_Z:
            z_r = load_reversed(z_rows, s_ze, s_zt, first, 0, L, rows_left, BLOCK_E, CHUNK)
            dy_scan_r *= z_r * tl.sigmoid(z_r)
        dy_offs_r = (b * E + e[:, None]) * L + r[None, :]
        y_r = tl.zeros((BLOCK_E, CHUNK), tl.float32)  # scan output, for dz
        grad_dtu_r = tl.zeros((BLOCK_E, CHUNK), tl.float32)  # dLoss/d(dt_t u_t)
        grad_dt_r = tl.zeros((BLOCK_E, CHUNK), tl.float32)  # dLoss/d dt_t through the decays
        h0_base = states_ptr + ((b * (chunks + 1) + chunk) * E + e) * N
        carry_in = carry_ptr + ((i % 2) * tl.num_programs(0) * E + b * E + e) * N  # [BLOCK_E], state 0
        carry_out = carry_ptr + (((i + 1) % 2) * tl.num_programs(0) * E + b * E + e) * N
        for n in range(0, N):
            A_n = tl.load(A_ptr + e * N + n, mask=row_ok, other=0.0).to(tl.float32)
            A2_n = A_n * LOG2_E
            B_n = tl.load(B_base + n * s_Bn + t[None, :] * s_Bt + 0 * e[:, None]).to(tl.float32)  # zero-padded
            B_r = load_reversed(B_base + n * s_Bn, 0, s_Bt, first, 0, L, rows_left, BLOCK_E, CHUNK)
            C_r = load_reversed(C_base + n * s_Cn, 0, s_Ct, first, 0, L, rows_left, BLOCK_E, CHUNK)
            h0 = tl.load(h0_base + n, mask=row_ok, other=0.0)
            a = tl.exp2(dt * A2_n[:, None])
            bu = dtu * B_n
            _, h = tl.associative_scan((a, bu + tl.where(steps[None, :] == 0, a * h0[:, None], 0.0)), 1, affine)
            decayed_r = reverse_steps(h - bu, BLOCK_E, CHUNK)  # a_t h_{t-1}, reverse time order
            h_r = decayed_r + dtu_r * B_r
            y_r += h_r * C_r
            # w_t = C_t dy_t + a_{t+1} w_{t+1}; past the chunk's end, a_{t+1} w_{t+1} is the carry
            carry = tl.load(carry_in + n, mask=row_ok, other=0.0)
            c_r = dy_scan_r * C_r + tl.where(steps[None, :] == 0, carry[:, None], 0.0)
            _, w_r = tl.associative_scan((tl.exp2(dt_next_r * A2_n[:, None]), c_r), 1, affine)
            grad_dtu_r += w_r * B_r
            q_r = w_r * decayed_r  # w_t a_t h_{t-1} = dLoss/d(dt_t A)
            grad_dt_r += q_r * A_n[:, None]
            # dA [b, E, N] (zeros on entry) is this program's alone: its adds come in chunk order
            tl.atomic_add(dA_ptr + (b * E + e) * N + n, tl.sum(q_r * dt_r, axis=1), mask=row_ok, sem="relaxed")
            grad_B_n = tl.sum(w_r * dtu_r, axis=0)  # rows past the group have dtu = dy_scan = 0
            grad_C_n = tl.sum(h_r * dy_scan_r, axis=0)
            tl.atomic_add(dB_ptr + (grad_BC_row + n) * L + r, grad_B_n, mask=r_ok, sem="relaxed")
            tl.atomic_add(dC_ptr + (grad_BC_row + n) * L + r, grad_C_n, mask=r_ok, sem="relaxed")
            w_first = tl.sum(tl.where(steps[None, :] == CHUNK - 1, w_r, 0.0), axis=1)
            tl.store(carry_out + n, tl.exp2(dt_first * A2_n) * w_first, mask=row_ok)
        tl.debug_barrier()  # the carries just written are read by other threads in the next chunk
        # the inputs that the state loop did not need, loaded again rather than kept in registers
        u_r = load_reversed(u_rows, s_ue, s_ut, first, 0, L, rows_left, BLOCK_E, CHUNK)
        grad_u = grad_dtu_r * dt_r
        grad_dt_r += grad_dtu_r * u_r
        if HAS_D:
            grad_u += dy_scan_r * D[:, None]
            grad_D += tl.sum(dy_scan_r * u_r, axis=1)
            y_r += D[:, None] * u_r
        if HAS_Z:
            dy = load_reversed(dy_rows, L, 1, first, 0, L, rows_left, BLOCK_E, CHUNK)
            z = load_reversed(z_rows, s_ze, s_zt, first, 0, L, rows_left, BLOCK_E, CHUNK)
            gate = tl.sigmoid(z)
            tl.store(dz_ptr + dy_offs_r, dy * y_r * gate * (1.0 + z * (1.0 - gate)), mask=mask_r)
        if SOFTPLUS:
            raw_r = load_reversed(delta_rows, s_de, s_dt, first, 0, L, rows_left, BLOCK_E, CHUNK)
            if HAS_BIAS:
                raw_r += bias[:, None]
            grad_dt_r = tl.where(raw_r > 20.0, grad_dt_r, grad_dt_r * tl.sigmoid(raw_r))
        grad_dt_r = tl.where(mask_r, grad_dt_r, 0.0)
        grad_bias += tl.sum(grad_dt_r, axis=1)
        tl.store(du_ptr + dy_offs_r, grad_u, mask=mask_r)
        tl.store(ddelta_ptr + dy_offs_r, grad_dt_r, mask=mask_r)
    if HAS_D:
        tl.store(dD_ptr + b * E + e, grad_D, mask=row_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * E + e, grad_bias, mask=row_ok)
