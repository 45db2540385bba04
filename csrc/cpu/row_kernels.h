// row_kernels.h — the work on one token's V logits, written once against the primitives of a
// simd_*.h header (W lanes of fp32: vf, vload, vstore, vexp, ...).
//
// grpo_cpu.cpp includes this file once per instruction set, inside that set's namespace and target
// region, so each copy is compiled for its ISA and chosen at run time. No include guard, no #include.
//
// A row is read at most three times, and only the first read comes from memory: a 32k-vocabulary
// row is 64-128 KiB and stays in L2 for the next two.
//   row_stats:      max over the row, then Σ e^(x−max) and Σ e^(x−max)·(x−max) (for the entropy);
//   row_stats_keep: the same, keeping every e^(x−max) in an fp32 scratch row (L2-resident);
//   row_grad:       dz_j = c·e^(x_j−max) for every j (the caller then writes the target entry);
//   row_grad_kept:  the same from the kept e^(x−max): one multiply per entry instead of an exp.
//   row_grad_lp:    dz_j = p_j·(a + b·log p_j) from a saved lse in two parts (max, log S): the backward
//                   of logprobs() (log-prob and entropy upstream gradients), one read of the row, no
//                   reduction.

// Copies the last n < W entries of a row to fp32 lanes, padding with `fill`.
template <class D>
static inline vf load_tail(D d, const typename D::T* p, int64_t n, float fill) {
  alignas(64) float buf[W];
  for (int i = 0; i < W; ++i) buf[i] = i < n ? to_f32(d, p[i]) : fill;
  return vload(F32{}, buf);
}

// t = x − max with x = z·inv_tau rounded to fp32 first (not one FMA from z): then the max entry has
// t = 0 exactly, so S >= 1, log S >= 0 and logp <= 0 (V = 1 gives logp = 0, as torch does).
static inline vf vshift(vf z, vf inv_tau, vf neg_max) { return vadd(vmul(z, inv_tau), neg_max); }

// One pass for the max, one for the sums. Entropy = lse − Σ p·x = log S − Σ e·t / S, where the
// e·t term of a banned (−inf) logit is 0: t is raised to −FLT_MAX first, so e·t = 0·(−FLT_MAX) = 0,
// never 0·(−inf) = NaN; a NaN logit stays NaN (it is max's second operand).
// KEEP: also store e_j = e^(t_j) (fp32) in ebuf[0..V), so that the gradient pass that follows at once
// needs no second exp (the same values: the gradient is bitwise the one row_grad would write).
// NEXT (may be null): the row this thread sweeps next. The exp pass runs from L2 and leaves the memory
// bus idle, so it asks for the next row's lines meanwhile (a prefetch: no effect on any value), and the
// next max pass finds them in cache instead of waiting for DRAM.
template <class D, bool KEEP>
static RowStats row_stats_impl(const void* zrow, int64_t V, float inv_tau, int64_t y, float* ebuf,
                               const void* next = nullptr) {
  using T = typename D::T;
  const D d{};
  const T* z = static_cast<const T*>(zrow);
  const char* pf = static_cast<const char*>(next);
  const int64_t v1 = V - V % W, v2 = V - V % (2 * W);
  constexpr int64_t kStep = 2 * W * (int64_t)sizeof(T);  // bytes of the row one iteration consumes

  vf m0 = vset1(-INFINITY), m1 = m0;
  int64_t i = 0;
  for (; i < v2; i += 2 * W) {
    m0 = vmax(m0, vload(d, z + i));
    m1 = vmax(m1, vload(d, z + i + W));
  }
  for (; i < v1; i += W) m0 = vmax(m0, vload(d, z + i));
  if (i < V) m1 = vmax(m1, load_tail(d, z + i, V - i, -INFINITY));
  const float zmax = vhmax(vmax(m0, m1));

  const float nxmax = -(zmax * inv_tau);  // τ > 0: the max of x is the max of z, scaled
  const vf it = vset1(inv_tau), nm = vset1(nxmax), lowest = vset1(-3.402823466e38f);
  vf s0 = vzero(), s1 = s0, q0 = s0, q1 = s0, r0 = s0, r1 = s0;
  for (i = 0; i < v2; i += 2 * W) {
    if (pf)
      for (int64_t off = 0; off < kStep; off += 64) __builtin_prefetch(pf + i * (int64_t)sizeof(T) + off, 0, 3);
    const vf t0 = vshift(vload(d, z + i), it, nm), t1 = vshift(vload(d, z + i + W), it, nm);
    const vf e0 = vexp(t0), e1 = vexp(t1);
    if (KEEP) { vstore(F32{}, ebuf + i, e0); vstore(F32{}, ebuf + i + W, e1); }
    s0 = vadd(s0, e0);
    s1 = vadd(s1, e1);
    r0 = vadd_nonzero(r0, t0, e0);
    r1 = vadd_nonzero(r1, t1, e1);
    q0 = vfmadd(e0, vmax(lowest, t0), q0);
    q1 = vfmadd(e1, vmax(lowest, t1), q1);
  }
  for (; i < v1; i += W) {
    const vf t0 = vshift(vload(d, z + i), it, nm);
    const vf e0 = vexp(t0);
    if (KEEP) vstore(F32{}, ebuf + i, e0);
    s0 = vadd(s0, e0);
    r0 = vadd_nonzero(r0, t0, e0);
    q0 = vfmadd(e0, vmax(lowest, t0), q0);
  }
  if (i < V) {  // padding lanes: t = −inf, e = 0, e·t = 0
    const vf t1 = vshift(load_tail(d, z + i, V - i, -INFINITY), it, nm);
    const vf e1 = vexp(t1);
    if (KEEP) {
      alignas(64) float buf[W];
      vstore(F32{}, buf, e1);
      for (int64_t k = 0; k < V - i; ++k) ebuf[i + k] = buf[k];
    }
    s1 = vadd(s1, e1);
    r1 = vadd_nonzero(r1, t1, e1);
    q1 = vfmadd(e1, vmax(lowest, t1), q1);
  }
  // S = k + R: k maxima (t = 0, e = 1 exactly) and the rest R. A lane holding a 1 absorbs the tiny
  // terms added to it (1 + 6e-8 is 1 in fp32), so log S is formed as log k + log1p(R/k) from R summed
  // apart: a peaked row keeps the digits of its entropy on every path, whatever the lane count.
  const float Sall = vhsum(vadd(s0, s1)), R = vhsum(vadd(r0, r1)), Q = vhsum(vadd(q0, q1));
  const float k = rintf(Sall - R);  // an integer >= 1; the rounding of Sall is far below 0.5
  const float S = k + R, logS = logf(k) + log1pf(R / k);

  RowStats o;
  o.xmax = -nxmax;
  o.sum = S;
  o.log_s = logS;
  o.logp = (to_f32(d, z[y]) * inv_tau + nxmax) - logS;  // (x_y − max) − log S: no large-lse cancellation
  o.entropy = logS - Q / S;
  return o;
}

template <class D>
static RowStats row_stats(const void* zrow, int64_t V, float inv_tau, int64_t y, const void* next) {
  return row_stats_impl<D, false>(zrow, V, inv_tau, y, nullptr, next);
}
template <class D>
static RowStats row_stats_keep(const void* zrow, int64_t V, float inv_tau, int64_t y, float* ebuf, const void* next) {
  return row_stats_impl<D, true>(zrow, V, inv_tau, y, ebuf, next);
}

// g[0..n) = c·e^(z·inv_tau − max) for the n < W entries of a row's tail, through an fp32 buffer.
template <class D>
static inline void grad_short(D d, const typename D::T* z, typename D::T* g, int64_t n, vf it, vf nm, vf vc) {
  alignas(64) float buf[W];
  vstore(F32{}, buf, vmul(vexp(vshift(load_tail(d, z, n, -INFINITY), it, nm)), vc));
  for (int64_t k = 0; k < n; ++k) g[k] = from_f32(d, buf[k]);
}

// Gradient stores. STREAM (non-temporal: the line is written without being read first, and does not
// displace the cache) pays where the destination is not in cache: a separate gradient buffer
// (inplace=False, the log-prob backward; the CPU backend reuses released buffers, so their pages are
// already faulted in) and zero rows nobody read (padding). In place, the row was just read and sits in
// L2: plain stores. Streaming needs the row aligned to the store width; a row that is not keeps plain
// stores (stream_ok), and every streamed row ends with a fence.
template <class D, bool STREAM>
static inline void put(D d, typename D::T* p, vf v) {
  if (STREAM) vstream(d, p, v);
  else vstore(d, p, v);
}
template <class D>
static inline bool stream_ok(bool stream, const void* grow) {
  return stream && (reinterpret_cast<uintptr_t>(grow) % (W * sizeof(typename D::T))) == 0;
}

// Zeros `bytes` bytes at p with streaming stores (memset for the unaligned ends).
static void row_zero(void* p, int64_t bytes) {
  char* c = static_cast<char*>(p);
  const int64_t head = std::min<int64_t>(bytes, (int64_t)((64 - (reinterpret_cast<uintptr_t>(c) & 63)) & 63));
  memset(c, 0, (size_t)head);
  c += head;
  bytes -= head;
  const int64_t step = W * (int64_t)sizeof(float), body = bytes - bytes % step;
  for (int64_t i = 0; i < body; i += step) vstream(F32{}, reinterpret_cast<float*>(c + i), vzero());
  memset(c + body, 0, (size_t)(bytes - body));
  vfence();
}

// dz_j = c·e^(x_j − max) for every j, in the row's dtype; with c = −g/(τ·S) that is −g·p_j/τ. The
// target entry is then overwritten by the caller. grow may equal zrow (inplace): every vector is read
// before the same addresses are written.
template <class D, bool STREAM>
static void row_grad_impl(const void* zrow, void* grow, int64_t V, float inv_tau, float nxmax, float c) {
  using T = typename D::T;
  const D d{};
  const T* z = static_cast<const T*>(zrow);
  T* g = static_cast<T*>(grow);
  const vf it = vset1(inv_tau), nm = vset1(nxmax), vc = vset1(c);
  const int64_t v1 = V - V % W, v2 = V - V % (2 * W);
  int64_t i = 0;
  for (; i < v2; i += 2 * W) {
    const vf e0 = vmul(vexp(vshift(vload(d, z + i), it, nm)), vc);
    const vf e1 = vmul(vexp(vshift(vload(d, z + i + W), it, nm)), vc);
    put<D, STREAM>(d, g + i, e0);
    put<D, STREAM>(d, g + i + W, e1);
  }
  for (; i < v1; i += W) put<D, STREAM>(d, g + i, vmul(vexp(vshift(vload(d, z + i), it, nm)), vc));
  if (i < V) grad_short(d, z + i, g + i, V - i, it, nm, vc);
  if (STREAM) vfence();
}
template <class D>
static void row_grad(const void* zrow, void* grow, int64_t V, float inv_tau, float nxmax, float c, bool stream) {
  if (stream_ok<D>(stream, grow)) row_grad_impl<D, true>(zrow, grow, V, inv_tau, nxmax, c);
  else row_grad_impl<D, false>(zrow, grow, V, inv_tau, nxmax, c);
}

// dz_j = c·e_j from the e_j row_stats_keep stored: no logits read, no exp. grow may be the logits.
template <class D, bool STREAM>
static void row_grad_kept_impl(const float* e, void* grow, int64_t V, float c) {
  using T = typename D::T;
  const D d{};
  T* g = static_cast<T*>(grow);
  const vf vc = vset1(c);
  const int64_t v1 = V - V % W;
  int64_t i = 0;
  for (; i < v1; i += W) put<D, STREAM>(d, g + i, vmul(vload(F32{}, e + i), vc));
  for (; i < V; ++i) g[i] = from_f32(d, e[i] * c);
  if (STREAM) vfence();
}
template <class D>
static void row_grad_kept(const float* e, void* grow, int64_t V, float c, bool stream) {
  if (stream_ok<D>(stream, grow)) row_grad_kept_impl<D, true>(e, grow, V, c);
  else row_grad_kept_impl<D, false>(e, grow, V, c);
}

// dz_j = e_j·(a + b·t_j) with t_j = (x_j − xmax) − log S = log p_j and e_j = e^(t_j) = p_j, in the row's
// dtype. The lse comes in its two parts, xmax and log S, and is never added up: x_j − lse at |x| ~ 1e4
// would lose an ulp of 1e4 (~1e-3) in log p_j, whereas x_j − xmax is exact near the max. Then:
// logprobs()' backward, p_j·(−g_logp − g_H·(log p_j + H))/τ for every j, where the caller folds
// a = −(g_logp + g_H·H)/τ and b = −g_H/τ and then rewrites the target entry. t is raised to −1000
// before the product: a banned (−inf) logit has e = 0 and must give 0, never 0·(−inf) = NaN (any
// t < ln(FLT_MIN) ≈ −87.3 already has e = 0, so the clamp changes no other term). A NaN logit stays
// NaN (it is max's second operand). grow may equal zrow: each vector is read before it is written.
// p·(a + b·max(t, −1000)): one vector of the log-prob row gradient, t = log p (both kernels below).
static inline vf lp_term(vf p, vf t, vf va, vf vb, vf floor_t) { return vmul(p, vfmadd(vb, vmax(floor_t, t), va)); }

template <class D, bool STREAM>
static void row_grad_lp_impl(const void* zrow, void* grow, int64_t V, float inv_tau, float xmax, float log_s, float a,
                             float b) {
  using T = typename D::T;
  const D d{};
  const T* z = static_cast<const T*>(zrow);
  T* g = static_cast<T*>(grow);
  const vf it = vset1(inv_tau), nm = vset1(-xmax), nl = vset1(-log_s), va = vset1(a), vb = vset1(b),
           floor_t = vset1(-1000.f);
  const int64_t v1 = V - V % W, v2 = V - V % (2 * W);
  int64_t i = 0;
  for (; i < v2; i += 2 * W) {
    const vf t0 = vadd(vshift(vload(d, z + i), it, nm), nl), t1 = vadd(vshift(vload(d, z + i + W), it, nm), nl);
    put<D, STREAM>(d, g + i, lp_term(vexp(t0), t0, va, vb, floor_t));
    put<D, STREAM>(d, g + i + W, lp_term(vexp(t1), t1, va, vb, floor_t));
  }
  for (; i < v1; i += W) {
    const vf t0 = vadd(vshift(vload(d, z + i), it, nm), nl);
    put<D, STREAM>(d, g + i, lp_term(vexp(t0), t0, va, vb, floor_t));
  }
  if (i < V) {
    alignas(64) float buf[W];
    const vf t0 = vadd(vshift(load_tail(d, z + i, V - i, -INFINITY), it, nm), nl);
    vstore(F32{}, buf, lp_term(vexp(t0), t0, va, vb, floor_t));
    for (int64_t k = 0; k < V - i; ++k) g[i + k] = from_f32(d, buf[k]);
  }
  if (STREAM) vfence();
}
template <class D>
static void row_grad_lp(const void* zrow, void* grow, int64_t V, float inv_tau, float xmax, float log_s, float a,
                        float b, bool stream) {
  if (stream_ok<D>(stream, grow)) row_grad_lp_impl<D, true>(zrow, grow, V, inv_tau, xmax, log_s, a, b);
  else row_grad_lp_impl<D, false>(zrow, grow, V, inv_tau, xmax, log_s, a, b);
}

// dz_j = p_j·(a + b·log p_j) as row_grad_lp, but p_j = e_j·(1/S) from the e_j that row_stats_keep stored
// and log p_j = (x_j − xmax) − log S from the row, which was just read and sits in L2: the fused loss's rows
// with an entropy bonus get their gradient without a second exp. grow may equal zrow (each vector is
// read before it is written).
template <class D, bool STREAM>
static void row_grad_kept_lp_impl(const float* e, const void* zrow, void* grow, int64_t V, float inv_tau, float xmax,
                                  float inv_s, float log_s, float a, float b) {
  using T = typename D::T;
  const D d{};
  const T* z = static_cast<const T*>(zrow);
  T* g = static_cast<T*>(grow);
  const vf it = vset1(inv_tau), nm = vset1(-xmax), nl = vset1(-log_s), vis = vset1(inv_s), va = vset1(a),
           vb = vset1(b), floor_t = vset1(-1000.f);
  const int64_t v1 = V - V % W;
  int64_t i = 0;
  for (; i < v1; i += W) {
    const vf t = vadd(vshift(vload(d, z + i), it, nm), nl);
    put<D, STREAM>(d, g + i, lp_term(vmul(vload(F32{}, e + i), vis), t, va, vb, floor_t));
  }
  if (i < V) {  // the tail through an fp32 buffer (padding lanes: e = 0, t = −inf), the same operations
    alignas(64) float buf[W];
    const vf t = vadd(vshift(load_tail(d, z + i, V - i, -INFINITY), it, nm), nl);
    vstore(F32{}, buf, lp_term(vmul(load_tail(F32{}, e + i, V - i, 0.f), vis), t, va, vb, floor_t));
    for (int64_t k = 0; k < V - i; ++k) g[i + k] = from_f32(d, buf[k]);
  }
  if (STREAM) vfence();
}
template <class D>
static void row_grad_kept_lp(const float* e, const void* zrow, void* grow, int64_t V, float inv_tau, float xmax,
                             float inv_s, float log_s, float a, float b, bool stream) {
  if (stream_ok<D>(stream, grow)) row_grad_kept_lp_impl<D, true>(e, zrow, grow, V, inv_tau, xmax, inv_s, log_s, a, b);
  else row_grad_kept_lp_impl<D, false>(e, zrow, grow, V, inv_tau, xmax, inv_s, log_s, a, b);
}

// e^x of n floats through vexp (the tests check its accuracy and edge cases through this).
static void exp_array(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(F32{}, y + i, vexp(vload(F32{}, x + i)));
  if (i < n) {
    alignas(64) float buf[W];
    vstore(F32{}, buf, vexp(load_tail(F32{}, x + i, n - i, 0.f)));
    for (int64_t k = 0; k < n - i; ++k) y[i + k] = buf[k];
  }
}

// bf16 of n floats through vstore(BF16): the conversion every bf16 gradient store makes (tests check it
// bitwise against torch's rounding on every path).
static void bf16_array(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(BF16{}, y + i, vload(F32{}, x + i));
  if (i < n) {
    alignas(64) uint16_t buf[W];
    vstore(BF16{}, buf, load_tail(F32{}, x + i, n - i, 0.f));
    for (int64_t k = 0; k < n - i; ++k) y[i + k] = buf[k];
  }
}

static const RowKernels kernels = {
    ISA_NAME,
    {&row_stats<F32>, &row_stats<BF16>, &row_stats<F16>},
    {&row_grad<F32>, &row_grad<BF16>, &row_grad<F16>},
    {&row_stats_keep<F32>, &row_stats_keep<BF16>, &row_stats_keep<F16>},
    {&row_grad_kept<F32>, &row_grad_kept<BF16>, &row_grad_kept<F16>},
    {&row_grad_lp<F32>, &row_grad_lp<BF16>, &row_grad_lp<F16>},
    &exp_array,
    &row_zero,
    {&row_grad_kept_lp<F32>, &row_grad_kept_lp<BF16>, &row_grad_kept_lp<F16>},
    &bf16_array,
};
