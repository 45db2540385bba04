// simd_generic.h — portable vector primitives of row_kernels.h (any CPU: aarch64, old x86, ...).
//
// An 8-lane struct of plain floats: fixed-trip loops the compiler turns into SSE2 / NEON code at
// -O3. Included by grpo_cpu.cpp inside `namespace generic { ... }`; no include guard, no #include.

constexpr int W = 8;
struct vf { float v[W]; };

static inline vf vset1(float a) { vf r; for (int i = 0; i < W; ++i) r.v[i] = a; return r; }
static inline vf vzero() { return vset1(0.f); }
// acc + e where t != 0 (a NaN t included), acc where t == 0 (see simd_avx512.h)
static inline vf vadd_nonzero(vf acc, vf t, vf e) { for (int i = 0; i < W; ++i) acc.v[i] += t.v[i] == 0.f ? 0.f : e.v[i]; return acc; }
static inline vf vadd(vf a, vf b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
static inline vf vmul(vf a, vf b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
static inline vf vfmadd(vf a, vf b, vf c) { for (int i = 0; i < W; ++i) c.v[i] = fmaf(a.v[i], b.v[i], c.v[i]); return c; }
// Same NaN rule as maxps: b is returned when either is NaN.
static inline vf vmax(vf a, vf b) { for (int i = 0; i < W; ++i) b.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return b; }
static inline float vhsum(vf a) { float s = 0.f; for (int i = 0; i < W; ++i) s += a.v[i]; return s; }
static inline float vhmax(vf a) { float m = a.v[0]; for (int i = 1; i < W; ++i) m = a.v[i] > m ? a.v[i] : m; return m; }

template <class D>
static inline vf vload(D d, const typename D::T* p) { vf r; for (int i = 0; i < W; ++i) r.v[i] = to_f32(d, p[i]); return r; }
template <class D>
static inline void vstore(D d, typename D::T* p, vf v) { for (int i = 0; i < W; ++i) p[i] = from_f32(d, v.v[i]); }
template <class D>  // no streaming stores in portable C++: plain ones
static inline void vstream(D d, typename D::T* p, vf v) { vstore(d, p, v); }
static inline void vfence() {}

static inline vf vexp(vf x) { for (int i = 0; i < W; ++i) x.v[i] = expf_poly(x.v[i]); return x; }
