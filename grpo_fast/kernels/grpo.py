"""Triton kernels of the fused GRPO loss (the math only; launchers live in grpo_fast/backends/triton_backend.py).

One program handles one token row z[b, t, :] at a time (B·T flattened into grid axis 0; the
token-level loss kernel loops over rows on a grid sized to L2) and walks its V
logits in blocks of BLOCK_V with an online logsumexp, so a row is never held in full and any V
works. Per-token results (log-prob, loss terms, metric contributions) go to small (N,) / (N, 8)
buffers that the launcher sums with torch: no atomics, so the stats are bitwise reproducible.

Kernels:
  _token_logprobs_kernel   no-grad pass: logp (and entropy, lse) per token; the public
                           token_logprobs, and (HAS_MASK: masked rows not read) pass 1 of the
                           sequence-level loss.
  _grpo_token_fwd_kernel   token-level loss: online lse + entropy, gathered logit, per-token loss,
                           KL and clip flags, and, when a gradient is wanted, the row's gradient
                           written by the same program: a persistent grid sized to L2 and a
                           reverse second sweep, so each logit is read once from HBM (see the
                           kernel's docstring and benchmarks/bytes_model.py).
  _grpo_seq_row_kernel     sequence level (GSPO), pass 2: one program per sequence computes the
                           row's ratio, the per-token terms, the row's stats and each token's dL/dlogp.
  _grpo_grad_kernel        sequence level, pass 3: writes dL/dz = g·(onehot(y) − p)/τ from the lse of pass 1.
  _logprobs_fwd_kernel     grpo_fast.logprobs forward: lse (two parts), logp, entropy per token (per-token τ allowed).
  _logprobs_bwd_kernel     grpo_fast.logprobs backward: one sweep writing
                           dL/dz = [g_logp·(onehot(y) − p) − g_H·p·(log p + H)]/τ from the saved lse parts.

Conventions: row offsets in int64 (B·T·V passes 2^31 at real sizes); every float option is a
run-time argument (a new epsilon or beta never recompiles); loss type and flags are tl.constexpr.
All math in float32 whatever the logits' dtype; group statistics of rewards in float64, like
csrc/common/grpo_math.h whose token_terms() `_token_terms` ports line by line.
"""
import triton
import triton.language as tl

# Per-token loss families (grpo_fast/_config.py FAMILY_CODES, grpo_math.h enum LossFamily).
CLIP = tl.constexpr(0)
IS_WEIGHT = tl.constexpr(1)
# KL estimators (grpo_math.h enum KlEstimator).
K3 = tl.constexpr(0)
K1 = tl.constexpr(1)
# scale_rewards codes (grpo_math.h enum ScaleRewards).
SCALE_GROUP = tl.constexpr(1)
SCALE_BATCH = tl.constexpr(2)
# Advantage sources (ADV_MODE): a (B,) tensor, a (B, T) tensor, or rewards + group size.
ADV_ROW = tl.constexpr(0)
ADV_TOKEN = tl.constexpr(1)
ADV_REWARDS = tl.constexpr(2)
# importance_sampling_ratio layouts (ISR_MODE): absent, (B,), (B, T).
ISR_ROW = tl.constexpr(1)
ISR_TOKEN = tl.constexpr(2)
# min/max in the loss propagate NaN as torch.min/clamp do (a NaN logit must reach the loss).
NAN = tl.constexpr(tl.PropagateNan.ALL)
# Width of a row of the per-token stats buffer (grpo_fast/_config.py NUM_STATS).
NUM_STATS = tl.constexpr(8)


# ---------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _online_lse_entropy(z_row, V, temperature, BLOCK_V: tl.constexpr, KEEP: tl.constexpr = False):
    """(shift, log_d, entropy) of x = z_row[0:V] / τ in one sweep (float32 accumulation);
    lse = shift + log_d, with shift = max x (0 while the row is all −inf) and log_d = log Σ exp(x − shift).

    Running max m, running d = Σ exp(x − m) and s = Σ exp(x − m)·(x − m), rescaled whenever m grows;
    entropy = log d − s/d. Keeping x − m (not x) in s avoids the cancellation of lse − Σ p·x when the
    distribution is peaked and |x| is large (entropy 1e-2 next to logits of 50). For the same reason
    the lse comes back in two parts: the log-prob (x_y − shift) − log_d and the probabilities
    exp((x − shift) − log_d) never form x − lse, which at |x| ~ 1e4 loses an ulp of 1e4 (~1e-3)
    even when the logits only spread over a few units around a common offset. A block (or a whole
    prefix) of −inf logits is legal: the shift is 0 while the max is −inf, so exp(−inf − shift)
    stays 0 instead of NaN, and p·(x − m) is taken as 0 where p == 0.

    x = z / τ is a division, not a product with 1/τ: it rounds as the eager reference's
    ``logits / temperature`` does (exactly so under the interpreter; Triton's div.full.f32 on GPUs),
    which matters at small τ where |x| ~ 1e3 and one ulp of x is visible in the log-prob.

    KEEP (the row is read again by a second sweep): loads with the L2 evict-last policy, so the
    row outlives the streaming gradient stores of the other rows in flight.
    """
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        if KEEP:
            raw = tl.load(z_row + cols, mask=cols < V, other=float("-inf"), eviction_policy="evict_last")
        else:
            raw = tl.load(z_row + cols, mask=cols < V, other=float("-inf"))
        x = raw.to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        xs = x - shift
        e = tl.exp(xs)
        # Σ e'·(x − m_new) = α·(s + (m − m_new)·d) for the terms so far (none yet while d == 0, when
        # m is −inf); for the new ones select x − m first so that 0·(−inf) is never formed
        s = alpha * (s + (tl.where(d > 0.0, m, shift) - shift) * d) + tl.sum(e * tl.where(e > 0.0, xs, 0.0), 0)
        d = d * alpha + tl.sum(e, 0)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_d = tl.log(d)
    return shift, log_d, log_d - s / d


@triton.jit
def _round_to(x, OUT: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 -> OUT, rounding to nearest even.

    On GPUs this is the hardware conversion (cvt.rn). Triton's CPU interpreter truncates float32 to
    bfloat16 instead (and its "rtne" mode is not round-to-nearest either), which would put the
    tests' bf16 gradients up to one ulp off: with SOFT_BF16 (set only under the interpreter) the
    rounding is done on the bits — add 0x7FFF plus the lowest kept bit, drop the low half.
    """
    if SOFT_BF16 and OUT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        r = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(OUT), r)  # NaN stays NaN (the carry could turn it into inf)
    else:
        return x.to(OUT)


@triton.jit
def _zero_row(g_row, V, BLOCK_V: tl.constexpr):
    """g_row[j] = 0 for j < V, without reading the logits (a masked row, or g = 0)."""
    offs = tl.arange(0, BLOCK_V)
    zero = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(g_row + cols, zero.to(g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def _write_row_grad(z_row, g_row, y, shift, log_d, gs, V, temperature, BLOCK_V: tl.constexpr, SOFT_BF16: tl.constexpr,
                    REVERSE: tl.constexpr = False, hs=0.0, H=0.0, HAS_ENT: tl.constexpr = False):
    """g_row[j] = gs·(1[j == y] − p_j) for j < V, with gs = dL/dlogp / τ, x = z / τ and
    p_j = exp((x_j − shift) − log_d) (the lse in its two parts, see _online_lse_entropy).
    HAS_ENT (the entropy bonus): minus hs·p_j·(log p_j + H), hs = dL/dH / τ and H the row's entropy
    (∂H/∂x_j = −p_j·(log p_j + H), as _logprobs_bwd_kernel; log p_j taken as 0 where p_j = 0).

    REVERSE (the second sweep of a row the same program has just read): blocks from the last to
    the first, so the first block re-read is the one read last, still in L2. Either way the loads
    are the row's last use (evict-first) and the gradient stores stream (evict-first): neither
    displaces the rows other programs are about to re-read.

    z_row and g_row may be the same memory (inplace): each block is read before it is written,
    and no other program touches this row.
    """
    offs = tl.arange(0, BLOCK_V)
    nblocks = tl.cdiv(V, BLOCK_V)
    for k in range(0, nblocks):
        if REVERSE:
            start = (nblocks - 1 - k) * BLOCK_V
        else:
            start = k * BLOCK_V
        cols = start + offs
        valid = cols < V
        x = tl.load(z_row + cols, mask=valid, other=float("-inf"), eviction_policy="evict_first").to(tl.float32) / temperature
        lp = (x - shift) - log_d
        p = tl.exp(lp)
        grad = gs * (tl.where(cols == y, 1.0, 0.0) - p)
        if HAS_ENT:
            grad -= hs * p * (tl.where(p > 0.0, lp, 0.0) + H)
        tl.store(g_row + cols, _round_to(grad, g_row.dtype.element_ty, SOFT_BF16), mask=valid,
                 eviction_policy="evict_first")


@triton.jit
def _entropy_term(coef_ptr, entropy_ptr, row, HAS: tl.constexpr):
    """(a row's entropy coefficient, its entropy H) from (N,) vectors, or (0, 0) when not HAS: the
    log-prob backward's ∂L/∂H, or the fused loss's entropy-bonus weight w_H."""
    if HAS:
        return tl.load(coef_ptr + row), tl.load(entropy_ptr + row)
    else:
        return 0.0, 0.0


@triton.jit
def _group_advantage(rewards_ptr, batch_std_ptr, b, G, adv_eps, SCALE: tl.constexpr, BLOCK_G: tl.constexpr):
    """Advantage of sequence b from its group's G rewards (float64 statistics, as grpo_math.h).

    A group of equal rewards gets exactly 0. For scale_rewards="batch", batch_std_ptr holds the
    unbiased std of all B rewards as a device scalar (no host synchronization).
    """
    start = (b // G) * G
    offs = tl.arange(0, BLOCK_G)
    valid = offs < G
    rw = tl.load(rewards_ptr + start + offs, mask=valid, other=0.0).to(tl.float64)
    n = tl.sum(valid.to(tl.float64), 0)  # = G, as a float64 (G itself may arrive as a plain int)
    mean = tl.sum(rw, 0) / n
    lo = tl.min(tl.where(valid, rw, float("inf")), 0)
    hi = tl.max(tl.where(valid, rw, float("-inf")), 0)
    dev = tl.where(valid, rw - mean, 0.0)
    std = tl.sqrt(tl.sum(dev * dev, 0) / (n - 1.0))
    centered = tl.load(rewards_ptr + b).to(tl.float64) - mean
    if SCALE == SCALE_GROUP:
        adv = centered / (std + adv_eps)  # float64 + float32 -> float64
    elif SCALE == SCALE_BATCH:
        adv = centered / (tl.load(batch_std_ptr).to(tl.float64) + adv_eps)
    else:  # "none" (Dr. GRPO): centered only
        adv = centered
    return tl.where(lo == hi, 0.0, adv).to(tl.float32)


@triton.jit
def _clip_flags(r, A, eps_low, eps_high, is_hi, FAMILY: tl.constexpr):
    """(clip_low, clip_high, cispo_clip) as float 0/1 (docs/spec.md, Metrics)."""
    zero = tl.zeros_like(r + A)
    # give r and A the same shape before combining comparisons with &: the interpreter mis-types a
    # scalar int1 broadcast against a block (a row's ratio against per-token advantages)
    r = r + zero
    A = A + zero
    low = zero
    high = zero
    cispo = zero
    if FAMILY == CLIP:
        low = tl.where((r < 1.0 - eps_low) & (A < 0.0), 1.0, 0.0)
        high = tl.where((r > 1.0 + eps_high) & (A > 0.0), 1.0, 0.0)
    elif FAMILY == IS_WEIGHT:
        cispo = tl.where((r > is_hi) & (A > 0.0), 1.0, 0.0)
    return low, high, cispo


@triton.jit
def _token_terms(logp, ref, A, isr, r, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi,
                 FAMILY: tl.constexpr, KL_EST: tl.constexpr, HAS_DELTA: tl.constexpr,
                 HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr, CLAMP_S: tl.constexpr, DUAL_CLIP: tl.constexpr):
    """grpo_math.h token_terms() in Triton; works on scalars and on blocks alike.

    Returns (loss, kl, d_logp, d_ratio, clip_low, clip_high, cispo_clip), flags as float 0/1:
      loss    = isr·L + beta·kl
      d_logp  = ∂loss/∂logp with r held fixed;  d_ratio = ∂loss/∂r with logp held fixed.
    """
    zero = tl.zeros_like(logp + r + A)
    dr_pass = 1.0
    if CLAMP_S:
        # verl's log-ratio clamp (lr_clamp > 0): r = clamp(r, e^−c, e^c), no gradient through r where active
        rmax = tl.exp(lr_clamp)
        rmin = tl.exp(-lr_clamp)
        dr_pass = tl.where(r > rmax, 0.0, tl.where(r < rmin, 0.0, 1.0)) + zero
        r = tl.where(r > rmax, rmax, tl.where(r < rmin, rmin, r))
    if FAMILY == CLIP:
        # L = −min(r1·A, r2·A). Derivative as torch autograd takes it through the reference:
        # min() splits a tie half/half, clamp passes the gradient on [lo, hi] inclusive.
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        r2 = tl.minimum(tl.maximum(r, lo, propagate_nan=NAN), hi, propagate_nan=NAN)
        if HAS_DELTA:
            r1 = tl.minimum(r, delta, propagate_nan=NAN)
            d1 = tl.where(r <= delta, 1.0, 0.0)
        else:
            r1 = r
            d1 = 1.0
        d2 = tl.where((r >= lo) & (r <= hi), 1.0, 0.0)
        v1 = r1 * A
        v2 = r2 * A
        dmin = tl.where(v1 < v2, A * d1, tl.where(v2 < v1, A * d2, 0.5 * A * (d1 + d2)))
        L = -tl.minimum(v1, v2, propagate_nan=NAN)
        dL_dr = -dmin + zero
        if DUAL_CLIP:
            # verl's dual clip: for A < 0, min(L, −A·c); a tie splits the gradient half/half (nested
            # where on 0/1 floats, not &: the interpreter mis-types a scalar int1 against a block)
            cap = -A * dual_c
            capped = tl.where(A < 0.0, tl.where(L > cap, 1.0, 0.0), 0.0) + zero
            tie = tl.where(A < 0.0, tl.where(L == cap, 1.0, 0.0), 0.0) + zero
            dL_dr = tl.where(capped > 0.0, 0.0, tl.where(tie > 0.0, 0.5 * dL_dr, dL_dr))
            L = tl.where(capped > 0.0, cap, L)
        dL_dlogp = zero
        clip_low, clip_high, cispo_clip = _clip_flags(r, A, eps_low, eps_high, is_hi, FAMILY)
        clip_low += zero
        clip_high += zero
        cispo_clip += zero
    elif FAMILY == IS_WEIGHT:
        # L = −stopgrad(clamp(r, is_lo, is_hi))·A·logp: no gradient through the ratio (MiniMax-M1).
        c = tl.minimum(tl.maximum(r, is_lo, propagate_nan=NAN), is_hi, propagate_nan=NAN)
        L = -c * A * logp
        dL_dr = zero
        dL_dlogp = -c * A + zero
        clip_low, clip_high, cispo_clip = _clip_flags(r, A, eps_low, eps_high, is_hi, FAMILY)
        clip_low += zero
        clip_high += zero
        cispo_clip += zero
    else:
        # SAPO: L = −(4/τs)·σ(τs(r − 1))·A, dL/dr = −4·σ(1 − σ)·A.
        ts = tl.where(A > 0.0, sapo_pos, sapo_neg)
        sg = 1.0 / (1.0 + tl.exp(-(ts * (r - 1.0))))
        L = -(4.0 / ts) * sg * A
        dL_dr = -4.0 * sg * (1.0 - sg) * A + zero
        dL_dlogp = zero
        clip_low = zero
        clip_high = zero
        cispo_clip = zero
    loss = isr * L
    d_ratio = isr * dL_dr
    d_logp = isr * dL_dlogp
    kl = zero
    if HAS_KL:
        # d = ref − logp; k3 = e^d − d − 1 (DeepSeekMath, TRL, verl low_var_kl), k1 = −d, k2 = d²/2.
        dd = ref - logp
        if KL_EST == K3:
            ed = tl.exp(dd)
            kl = ed - dd - 1.0
            dkl = 1.0 - ed
        elif KL_EST == K1:
            kl = -dd
            dkl = 1.0 + zero
        else:
            kl = 0.5 * dd * dd
            dkl = -dd
        if BIAS_KL:
            d_ratio += beta * kl  # ∂(r·kl)/∂r
            kl = kl * r
            dkl = dkl * r
        loss += beta * kl
        d_logp += beta * dkl
    d_ratio = d_ratio * dr_pass
    return loss, kl, d_logp, d_ratio, clip_low, clip_high, cispo_clip


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _row_logp(row, logits_ptr, ids_ptr, logp_ptr, T, V, stride_lb, stride_lt, temperature, BLOCK_V: tl.constexpr,
              KEEP: tl.constexpr = False):
    """Token row ``row`` = b·T + t (int64): its logits row, target, the sweep over V (lse and
    entropy), the gathered log-prob, stored to logp_ptr[row]. The start of every per-token kernel."""
    b = row // T
    t = row - b * T
    z_row = logits_ptr + b * stride_lb + t * stride_lt
    shift, log_d, entropy = _online_lse_entropy(z_row, V, temperature, BLOCK_V, KEEP)
    y = tl.load(ids_ptr + row)
    logp = (tl.load(z_row + y).to(tl.float32) / temperature - shift) - log_d
    tl.store(logp_ptr + row, logp)
    return b, t, z_row, y, shift, log_d, entropy, logp


@triton.jit
def _token_logprobs_kernel(
    # pointers
    logits_ptr, ids_ptr, mask_ptr, logp_ptr, entropy_ptr, lse_ptr,
    # sizes and strides (elements)
    T, V, stride_lb, stride_lt,
    # run-time floats
    temperature,
    # meta-parameters
    HAS_MASK: tl.constexpr, STORE_ENTROPY: tl.constexpr, STORE_LSE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """logp[row] = (x[y] − shift) − log_d (and entropy, lse) of token row = b·T + t; no gradient.

    The public token_logprobs, and (HAS_MASK) pass 1 of the sequence-level loss, where a masked
    row (mask_ptr[row] == 0) is not read: log-prob, entropy and lse 0.
    lse_ptr (N, 2): the lse in its two parts (shift, log_d) of _online_lse_entropy, for pass 3."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0.0
    else:
        keep = True
    if keep:
        _b, _t, _z, _y, shift, log_d, entropy, _lp = _row_logp(row, logits_ptr, ids_ptr, logp_ptr, T, V, stride_lb,
                                                               stride_lt, temperature, BLOCK_V)
        _store_row_lse(entropy_ptr, lse_ptr, row, entropy, shift, log_d, STORE_ENTROPY, STORE_LSE)
    else:
        tl.store(logp_ptr + row, 0.0)
        _store_row_lse(entropy_ptr, lse_ptr, row, 0.0, 0.0, 0.0, STORE_ENTROPY, STORE_LSE)


@triton.jit
def _store_row_lse(entropy_ptr, lse_ptr, row, entropy, shift, log_d, STORE_ENTROPY: tl.constexpr,
                   STORE_LSE: tl.constexpr):
    if STORE_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    if STORE_LSE:
        tl.store(lse_ptr + 2 * row, shift)
        tl.store(lse_ptr + 2 * row + 1, log_d)


@triton.jit
def _grpo_token_fwd_kernel(
    # pointers: inputs
    logits_ptr, ids_ptr, mask_ptr, weight_ptr, adv_ptr, rewards_ptr, batch_std_ptr, old_ptr, ref_ptr, isr_ptr,
    # pointers: outputs
    grad_ptr, logp_ptr, stats_ptr,
    # sizes and strides (elements)
    N, T, V, G, stride_lb, stride_lt, stride_gb, stride_gt,
    # run-time floats
    temperature, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi, adv_eps,
    # meta-parameters
    FAMILY: tl.constexpr, KL_EST: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr,
    BIAS_KL: tl.constexpr, HAS_OLD: tl.constexpr, ADV_MODE: tl.constexpr, SCALE: tl.constexpr,
    ISR_MODE: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_V: tl.constexpr,
    SOFT_BF16: tl.constexpr = False, CLAMP_S: tl.constexpr = False, DUAL_CLIP: tl.constexpr = False,
    # the entropy bonus: ew_ptr (N,) w_H, loss −= w_H·H and its gradient (HAS_ENT; off: no code at all)
    ew_ptr=None, HAS_ENT: tl.constexpr = False,
):
    """Token-level loss of token rows pid, pid + P, pid + 2P, ... (P = the grid), and each row's
    gradient when HAS_GRAD.

    One read + one write of each logit from HBM, by design (docs: the bytes model in
    benchmarks/bytes_model.py): the launcher sizes the grid P with persistent_grid() so that the
    P rows in flight fit in the L2 budget; sweep 1 reads a row forwards with evict-last loads,
    sweep 2 (the gradient) re-reads it backwards — the block read last comes first, from L2 — with
    evict-first loads and evict-first gradient stores, which stream to HBM without pushing the
    other programs' rows out.
    The choice by V and architecture: the grid is P = min(N, ⌊0.75·L2 / (V·e)⌋, 2 per SM) — on an
    H100/H200 (50 MiB L2, 132 SMs) 264 programs at V = 32k, 129 for bf16 rows of 152k, 64 for
    fp32 rows of 152k (then fewer programs than SMs: the price of the single read, each streaming
    16 KB per step; the GPU suite measures whether that still reaches the bandwidth). Only a row
    larger than 0.75·L2 (V·e > 37 MiB) gets no guarantee. The row is not kept on chip instead:
    in registers it needs BLOCK_V = V (a 32k bf16 row is 64 values a thread at 16 warps: it
    spills), Triton has no explicit shared-memory buffers or sm_90 cluster (DSMEM) memory, and
    even 228 KB of shared memory holds under 120k bf16 logits. L2 residency serves every V up to
    that 37 MiB on sm_80 and sm_90 alike, and the launcher reads the L2 size of the device.
    Which program handles which row changes nothing in the results (rows are independent; a
    row's reduction order depends on BLOCK_V and num_warps only).

    stats_ptr[row, :] = [w·loss, m·entropy, m·kl, m·low, m·high, m·(low|high), m·cispo, 0];
    logp_ptr[row] = logp. A masked row (m = 0) is not read: zeros everywhere, a zero gradient row
    (a NaN in it does not reach the loss), as in the eager reference.
    """
    for row0 in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.full((), 0, tl.int64) + row0  # int64 (row0 is a plain int under the interpreter)
        m0 = tl.load(mask_ptr + row)
        if m0 == 0.0:
            out0 = stats_ptr + row * NUM_STATS
            for k in tl.static_range(NUM_STATS):
                tl.store(out0 + k, 0.0)
            tl.store(logp_ptr + row, 0.0)
            if HAS_GRAD:
                b0 = row // T
                _zero_row(grad_ptr + b0 * stride_gb + (row - b0 * T) * stride_gt, V, BLOCK_V)
        else:
            _grpo_token_row(row, logits_ptr, ids_ptr, mask_ptr, weight_ptr, adv_ptr, rewards_ptr, batch_std_ptr, old_ptr,
                            ref_ptr, isr_ptr, grad_ptr, logp_ptr, stats_ptr, T, V, G, stride_lb, stride_lt, stride_gb,
                            stride_gt, temperature, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi, adv_eps, FAMILY,
                            KL_EST, HAS_DELTA, HAS_KL, BIAS_KL, HAS_OLD, ADV_MODE, SCALE, ISR_MODE, HAS_GRAD, BLOCK_G,
                            BLOCK_V, SOFT_BF16, CLAMP_S, DUAL_CLIP, ew_ptr, HAS_ENT)


@triton.jit
def _grpo_token_row(
    row, logits_ptr, ids_ptr, mask_ptr, weight_ptr, adv_ptr, rewards_ptr, batch_std_ptr, old_ptr, ref_ptr, isr_ptr,
    grad_ptr, logp_ptr, stats_ptr, T, V, G, stride_lb, stride_lt, stride_gb, stride_gt,
    temperature, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi, adv_eps,
    FAMILY: tl.constexpr, KL_EST: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr,
    BIAS_KL: tl.constexpr, HAS_OLD: tl.constexpr, ADV_MODE: tl.constexpr, SCALE: tl.constexpr,
    ISR_MODE: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_V: tl.constexpr,
    SOFT_BF16: tl.constexpr, CLAMP_S: tl.constexpr, DUAL_CLIP: tl.constexpr, ew_ptr, HAS_ENT: tl.constexpr,
):
    """The body of _grpo_token_fwd_kernel for a valid (unmasked) token row."""
    b, t, z_row, y, shift, log_d, entropy, logp = _row_logp(row, logits_ptr, ids_ptr, logp_ptr, T, V, stride_lb,
                                                            stride_lt, temperature, BLOCK_V, HAS_GRAD)

    # per-token side inputs
    m = tl.load(mask_ptr + row)
    w = tl.load(weight_ptr + row)
    if ADV_MODE == ADV_ROW:
        A = tl.load(adv_ptr + b)
    elif ADV_MODE == ADV_TOKEN:
        A = tl.load(adv_ptr + row)
    else:
        A = _group_advantage(rewards_ptr, batch_std_ptr, b, G, adv_eps, SCALE, BLOCK_G)
    if HAS_OLD:
        r = tl.exp(logp - tl.load(old_ptr + row))
    else:
        # on-policy: old = logp.detach(), r = exp(logp − logp) (1, or NaN exactly where the
        # reference's is), and dr/dlogp = r still holds
        r = tl.exp(logp - logp)
    if ISR_MODE == ISR_ROW:
        isr = tl.load(isr_ptr + b)
    elif ISR_MODE == ISR_TOKEN:
        isr = tl.load(isr_ptr + row)
    else:
        isr = 1.0
    if HAS_KL:
        ref = tl.load(ref_ptr + row)
    else:
        ref = logp

    loss, kl, d_logp, d_ratio, low, high, cispo = _token_terms(
        logp, ref, A, isr, r, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi,
        FAMILY, KL_EST, HAS_DELTA, HAS_KL, BIAS_KL, CLAMP_S, DUAL_CLIP)

    out = stats_ptr + row * NUM_STATS
    if HAS_ENT:
        ew = tl.load(ew_ptr + row)
        tl.store(out + 0, w * loss - ew * entropy)
    else:
        ew = 0.0
        tl.store(out + 0, w * loss)
    tl.store(out + 1, m * entropy)
    tl.store(out + 2, m * kl)
    tl.store(out + 3, m * low)
    tl.store(out + 4, m * high)
    tl.store(out + 5, m * (low + high))  # low needs A < 0, high A > 0: never both
    tl.store(out + 6, m * cispo)
    tl.store(out + 7, 0.0)

    if HAS_GRAD:
        # token level: dr/dlogp = r, so dL/dlogp = w·(d_logp + r·d_ratio); zero on padding (w = 0)
        g = w * (d_logp + r * d_ratio)
        g_row = grad_ptr + b * stride_gb + t * stride_gt
        _write_row_grad(z_row, g_row, y, shift, log_d, g / temperature, V, temperature, BLOCK_V, SOFT_BF16, True,
                        -ew / temperature, entropy, HAS_ENT)


@triton.jit
def _seq_tile(logp_ptr, mask_ptr, weight_ptr, adv_ptr, isr_ptr, ref_ptr, idx, valid, A_row, isr_row,
              ADV_MODE: tl.constexpr, ISR_MODE: tl.constexpr, HAS_KL: tl.constexpr):
    """One tile of a row's per-token inputs at flat indices ``idx``: logp, mask, weight, advantage,
    isr and ref (the row's values where they are per row). Both passes of the sequence-level row
    kernel read the same tile."""
    lp = tl.load(logp_ptr + idx, mask=valid, other=0.0)
    m = tl.load(mask_ptr + idx, mask=valid, other=0.0)
    w = tl.load(weight_ptr + idx, mask=valid, other=0.0)
    if ADV_MODE == ADV_TOKEN:
        A = tl.load(adv_ptr + idx, mask=valid, other=0.0)
    else:
        A = A_row
    if ISR_MODE == ISR_TOKEN:
        isr = tl.load(isr_ptr + idx, mask=valid, other=0.0)
    else:
        isr = isr_row
    if HAS_KL:
        ref = tl.load(ref_ptr + idx, mask=valid, other=0.0)
    else:
        ref = lp
    return lp, m, w, A, isr, ref


@triton.jit
def _row_clip_flags(acc_low, acc_high, acc_cispo, r, A_row, eps_low, eps_high, is_hi, FAMILY: tl.constexpr,
                    ADV_MODE: tl.constexpr):
    """The clip flags of a sequence at sequence level (the row-flag rule): with a per-token
    advantage, the sums of the per-token flags over the valid tokens (acc_* are per-lane partial
    sums); with a per-row advantage the ratio and the advantage are the row's, so its flags count
    once, padding or not (TRL and the reference average such (B, 1) flags over the B rows)."""
    if ADV_MODE == ADV_TOKEN:
        low_n = tl.sum(acc_low, 0)
        high_n = tl.sum(acc_high, 0)
        cispo_n = tl.sum(acc_cispo, 0)
    else:
        low_n, high_n, cispo_n = _clip_flags(r, A_row, eps_low, eps_high, is_hi, FAMILY)
    return low_n, high_n, cispo_n


@triton.jit
def _grpo_seq_row_kernel(
    # pointers: inputs (all (B, T) or (B,), contiguous)
    logp_ptr, entropy_ptr, mask_ptr, weight_ptr, adv_ptr, rewards_ptr, batch_std_ptr, old_ptr, ref_ptr, isr_ptr,
    # pointers: outputs
    g_ptr, stats_ptr,
    # sizes
    T, G,
    # run-time floats
    eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi, adv_eps,
    # meta-parameters
    FAMILY: tl.constexpr, KL_EST: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr,
    BIAS_KL: tl.constexpr, HAS_OLD: tl.constexpr, ADV_MODE: tl.constexpr, SCALE: tl.constexpr,
    ISR_MODE: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
    CLAMP_S: tl.constexpr = False, DUAL_CLIP: tl.constexpr = False,
):
    """Sequence-level (GSPO) pass 2 for sequence b = program_id: needs only the (B, T) log-probs.

    s = Σ_t m·(logp − old) / max(Σ m, 1), r = exp(s) for the whole row. Writes the row's stats
    (sums; clip flags once per row when the advantage is per row, else per valid token) and, when
    HAS_GRAD, g[t] = w·d_logp + (Σ_t' w·d_ratio)·r·m[t]/max(Σ m, 1) = ∂loss/∂logp[b, t].
    """
    b = tl.program_id(0).to(tl.int64)
    base = b * T
    offs = tl.arange(0, BLOCK_T)

    # the row's ratio
    acc_s = tl.zeros((BLOCK_T,), tl.float32)
    acc_m = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        valid = cols < T
        lp = tl.load(logp_ptr + base + cols, mask=valid, other=0.0)
        m = tl.load(mask_ptr + base + cols, mask=valid, other=0.0)
        if HAS_OLD:
            old = tl.load(old_ptr + base + cols, mask=valid, other=0.0)
        else:
            old = lp
        acc_s += tl.where(m != 0.0, m * (lp - old), 0.0)  # a masked token is skipped, not multiplied by 0
        acc_m += m
    n = tl.maximum(tl.sum(acc_m, 0), 1.0)
    r = tl.exp(tl.sum(acc_s, 0) / n)

    if ADV_MODE == ADV_ROW:
        A_row = tl.load(adv_ptr + b)
    elif ADV_MODE == ADV_REWARDS:
        A_row = _group_advantage(rewards_ptr, batch_std_ptr, b, G, adv_eps, SCALE, BLOCK_G)
    else:
        A_row = 0.0
    if ISR_MODE == ISR_ROW:
        isr_row = tl.load(isr_ptr + b)
    else:
        isr_row = 1.0

    # per-token terms, the row's stats and Σ w·d_ratio
    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_ent = tl.zeros((BLOCK_T,), tl.float32)
    acc_kl = tl.zeros((BLOCK_T,), tl.float32)
    acc_low = tl.zeros((BLOCK_T,), tl.float32)
    acc_high = tl.zeros((BLOCK_T,), tl.float32)
    acc_cispo = tl.zeros((BLOCK_T,), tl.float32)
    acc_dr = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        valid = cols < T
        lp, m, w, A, isr, ref = _seq_tile(logp_ptr, mask_ptr, weight_ptr, adv_ptr, isr_ptr, ref_ptr, base + cols, valid,
                                          A_row, isr_row, ADV_MODE, ISR_MODE, HAS_KL)
        ent = tl.load(entropy_ptr + base + cols, mask=valid, other=0.0)
        loss, kl, d_logp, d_ratio, low, high, cispo = _token_terms(
            lp, ref, A, isr, r, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi,
            FAMILY, KL_EST, HAS_DELTA, HAS_KL, BIAS_KL, CLAMP_S, DUAL_CLIP)
        # tl.where on `valid`, not a product: lanes past T load zeros, but a non-finite row
        # ratio would still make 0·x NaN there
        acc_loss += tl.where(valid, w * loss, 0.0)
        acc_ent += tl.where(valid, m * ent, 0.0)
        acc_kl += tl.where(valid, m * kl, 0.0)
        acc_low += tl.where(valid, m * low, 0.0)
        acc_high += tl.where(valid, m * high, 0.0)
        acc_cispo += tl.where(valid, m * cispo, 0.0)
        acc_dr += tl.where(valid, w * d_ratio, 0.0)

    low_n, high_n, cispo_n = _row_clip_flags(acc_low, acc_high, acc_cispo, r, A_row, eps_low, eps_high, is_hi, FAMILY, ADV_MODE)
    out = stats_ptr + b * NUM_STATS
    tl.store(out + 0, tl.sum(acc_loss, 0))
    tl.store(out + 1, tl.sum(acc_ent, 0))
    tl.store(out + 2, tl.sum(acc_kl, 0))
    tl.store(out + 3, low_n)
    tl.store(out + 4, high_n)
    tl.store(out + 5, low_n + high_n)  # low needs A < 0, high A > 0: never both, so |low ∪ high| = low + high
    tl.store(out + 6, cispo_n)
    tl.store(out + 7, 0.0)

    if HAS_GRAD:
        row_dr = tl.sum(acc_dr, 0) * r / n  # ∂loss/∂s of the row, times ds/dlogp's 1/n
        for start in range(0, T, BLOCK_T):
            cols = start + offs
            valid = cols < T
            lp, m, w, A, isr, ref = _seq_tile(logp_ptr, mask_ptr, weight_ptr, adv_ptr, isr_ptr, ref_ptr, base + cols,
                                              valid, A_row, isr_row, ADV_MODE, ISR_MODE, HAS_KL)
            _l, _k, d_logp, _dr, _lo, _hi, _ci = _token_terms(
                lp, ref, A, isr, r, eps_low, eps_high, delta, beta, sapo_pos, sapo_neg, lr_clamp, dual_c, is_lo, is_hi,
                FAMILY, KL_EST, HAS_DELTA, HAS_KL, BIAS_KL, CLAMP_S, DUAL_CLIP)
            g = tl.where(m != 0.0, w * d_logp + row_dr * m, 0.0)  # a masked token: 0, its row is not read
            tl.store(g_ptr + base + cols, g, mask=valid)


@triton.jit
def _grpo_grad_kernel(
    # pointers
    logits_ptr, ids_ptr, lse_ptr, g_ptr, grad_ptr,
    # sizes and strides (elements)
    T, V, stride_lb, stride_lt, stride_gb, stride_gt,
    # run-time floats
    temperature,
    # meta-parameters
    BLOCK_V: tl.constexpr, SOFT_BF16: tl.constexpr = False,
    # the entropy bonus: ew_ptr (N,) w_H and entropy_ptr (N,) pass 1's H (HAS_ENT)
    ew_ptr=None, entropy_ptr=None, HAS_ENT: tl.constexpr = False,
):
    """Sequence level, pass 3: grad[b, t, :] = g·(onehot(y) − softmax(x))/τ with pass 1's lse
    (lse_ptr (N, 2): shift and log_d), plus the entropy bonus's w_H·p·(log p + H)/τ when HAS_ENT."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    g = tl.load(g_ptr + row)
    ew, H = _entropy_term(ew_ptr, entropy_ptr, row, HAS_ENT)
    if (g == 0.0) & (ew == 0.0):  # a masked row (or a zero gradient): zeros, the row is not read
        _zero_row(grad_ptr + b * stride_gb + t * stride_gt, V, BLOCK_V)
    else:
        shift = tl.load(lse_ptr + 2 * row)
        log_d = tl.load(lse_ptr + 2 * row + 1)
        y = tl.load(ids_ptr + row)
        _write_row_grad(logits_ptr + b * stride_lb + t * stride_lt, grad_ptr + b * stride_gb + t * stride_gt,
                        y, shift, log_d, g / temperature, V, temperature, BLOCK_V, SOFT_BF16, False,
                        -ew / temperature, H, HAS_ENT)


# ---------------------------------------------------------------------------------------------
# differentiable log-probs and entropy (grpo_fast/logprobs.py)


@triton.jit
def _row_tau(tau_ptr, row, temperature, TAU_PER_ROW: tl.constexpr):
    if TAU_PER_ROW:
        return tl.load(tau_ptr + row)
    else:
        return temperature


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    logits_ptr, ids_ptr, tau_ptr, mask_ptr, logp_ptr, entropy_ptr, lse_ptr,
    # sizes and strides (elements)
    T, V, stride_lb, stride_lt,
    # run-time floats
    temperature,
    # meta-parameters
    TAU_PER_ROW: tl.constexpr, HAS_MASK: tl.constexpr, STORE_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """logp[row] = (x[y] − shift) − log_d, the lse in its two parts (lse_ptr (N, 2): shift, log_d; see
    _online_lse_entropy) for backward, and entropy[row] when STORE_ENTROPY, with x = z / τ.
    HAS_MASK: a masked row (mask_ptr[row] == 0, padding) is not read; all its outputs are 0."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    z_row = logits_ptr + b * stride_lb + t * stride_lt
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0.0
    else:
        keep = True
    if keep:
        tau = _row_tau(tau_ptr, row, temperature, TAU_PER_ROW)
        shift, log_d, entropy = _online_lse_entropy(z_row, V, tau, BLOCK_V)
        y = tl.load(ids_ptr + row)
        tl.store(logp_ptr + row, (tl.load(z_row + y).to(tl.float32) / tau - shift) - log_d)
        tl.store(lse_ptr + 2 * row, shift)
        tl.store(lse_ptr + 2 * row + 1, log_d)
        if STORE_ENTROPY:
            tl.store(entropy_ptr + row, entropy)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + 2 * row, 0.0)
        tl.store(lse_ptr + 2 * row + 1, 0.0)
        if STORE_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)


@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    logits_ptr, ids_ptr, tau_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, grad_ptr,
    # sizes and strides (elements)
    T, V, stride_lb, stride_lt, stride_gb, stride_gt,
    # run-time floats
    temperature,
    # meta-parameters
    TAU_PER_ROW: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
    SOFT_BF16: tl.constexpr = False,
):
    """grad[row, :] = (g_logp·(onehot(y) − p) − g_H·p·(log p + H)) / τ from the forward's lse parts,
    log p = (x − shift) − log_d (lse_ptr (N, 2)), never x − lse (an ulp of |x| lost at |x| ~ 1e4).

    z_row and g_row may be the same memory (fused-linear chunks): each block is read before it is
    written, and no other program touches this row. A banned (−inf) logit has p = 0: log p is
    replaced by 0 there, so its gradient is 0 and never 0·(−inf).
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    z_row = logits_ptr + b * stride_lb + t * stride_lt
    g_row = grad_ptr + b * stride_gb + t * stride_gt
    if HAS_G_LOGP:
        gl = tl.load(g_logp_ptr + row)
    else:
        gl = 0.0
    gh, H = _entropy_term(g_ent_ptr, entropy_ptr, row, HAS_G_ENT)
    offs = tl.arange(0, BLOCK_V)
    if (gl == 0.0) & (gh == 0.0):
        # padding the loss masked out: zeros, without reading the row
        zero = tl.zeros((BLOCK_V,), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(g_row + cols, zero.to(g_row.dtype.element_ty), mask=cols < V)
    else:
        tau = _row_tau(tau_ptr, row, temperature, TAU_PER_ROW)
        shift = tl.load(lse_ptr + 2 * row)
        log_d = tl.load(lse_ptr + 2 * row + 1)
        y = tl.load(ids_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            valid = cols < V
            lp = (tl.load(z_row + cols, mask=valid, other=float("-inf")).to(tl.float32) / tau - shift) - log_d
            p = tl.exp(lp)
            d = gl * (tl.where(cols == y, 1.0, 0.0) - p) - gh * p * (tl.where(p > 0.0, lp, 0.0) + H)
            tl.store(g_row + cols, _round_to(d / tau, g_row.dtype.element_ty, SOFT_BF16), mask=valid)
