// simd_avx2.h — the vector primitives of row_kernels.h on AVX2 + FMA + F16C (8 fp32 lanes).
//
// Included by grpo_cpu.cpp inside `namespace avx2 { ... }` under a target("avx2,fma,f16c") region,
// so no include guard and no #include here.

constexpr int W = 8;
using vf = __m256;

static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
// max(a, b) returns b when either is NaN (maxps semantics): callers put the value to keep second.
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
// acc + e where t != 0 (a NaN t included), acc where t == 0 (see simd_avx512.h)
static inline vf vadd_nonzero(vf acc, vf t, vf e) { return _mm256_add_ps(acc, _mm256_and_ps(_mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_NEQ_UQ), e)); }
static inline float vhsum(vf a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
static inline float vhmax(vf a) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// ---- loads / stores in the storage dtype ----------------------------------------------------------
static inline vf vload(F32, const float* p) { return _mm256_loadu_ps(p); }
static inline vf vload(BF16, const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline vf vload(F16, const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// fp32 -> 8 bf16 / fp16, round to nearest even (as torch). bf16 works on the integer bits; a NaN
// becomes a quiet NaN, not an inf.
static inline __m128i to_16bit(BF16, vf v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  // Every lane is < 2^16, so the unsigned-saturating pack is exact; it interleaves the two 128-bit
  // halves, which the 64-bit permute puts back in order.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
static inline __m128i to_16bit(F16, vf v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

static inline void vstore(F32, float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline void vstore(BF16 d, uint16_t* p, vf v) { _mm_storeu_si128((__m128i*)p, to_16bit(d, v)); }
static inline void vstore(F16 d, uint16_t* p, vf v) { _mm_storeu_si128((__m128i*)p, to_16bit(d, v)); }
// Non-temporal stores (p aligned to W·sizeof(T)) and the fence that orders them; see simd_avx512.h.
static inline void vstream(F32, float* p, vf v) { _mm256_stream_ps(p, v); }
static inline void vstream(BF16 d, uint16_t* p, vf v) { _mm_stream_si128((__m128i*)p, to_16bit(d, v)); }
static inline void vstream(F16 d, uint16_t* p, vf v) { _mm_stream_si128((__m128i*)p, to_16bit(d, v)); }
static inline void vfence() { _mm_sfence(); }

// ---- e^x (exp_poly.h) -----------------------------------------------------------------------------
static inline vf vexp(vf x) {
  const vf lo = _mm256_set1_ps(EXP_MIN_X), hi = _mm256_set1_ps(EXP_MAX_X);
  // Clamp to [EXP_MIN_X, EXP_MAX_X] (NaN kept: it is the second operand of max), so n ∈ [-126, 127].
  const vf xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  const vf n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
  vf q = _mm256_fmadd_ps(_mm256_set1_ps(EXP_C6), r, _mm256_set1_ps(EXP_C5));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(EXP_C4));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(EXP_C3));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(EXP_C2));
  const vf p = _mm256_add_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  vf y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));       // -> 0
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));  // -> inf
}
