// simd_avx512.h — the vector primitives of row_kernels.h on AVX-512 (16 fp32 lanes).
//
// Included by grpo_cpu.cpp inside `namespace avx512 { ... }` under a target("avx512f,avx512bw,
// avx512vl,avx512dq,...") region, so no include guard and no #include here: <immintrin.h>,
// dtype.h and exp_poly.h are included at file scope before.

constexpr int W = 16;
using vf = __m512;

static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a·b + c, one rounding
// max(a, b) returns b when either is NaN (maxps semantics): callers put the value to keep second.
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
// acc + e where t != 0 (a NaN t included), acc where t == 0: sums the terms of a row other than its maxima
static inline vf vadd_nonzero(vf acc, vf t, vf e) { return _mm512_mask_add_ps(acc, _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_NEQ_UQ), acc, e); }

// ---- loads / stores in the storage dtype (unaligned: rows start anywhere) -------------------------
static inline vf vload(F32, const float* p) { return _mm512_loadu_ps(p); }
static inline vf vload(BF16, const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline vf vload(F16, const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// fp32 -> 16 bf16 / fp16, round to nearest even (as torch). bf16 works on the integer bits; a NaN
// becomes a quiet NaN, not an inf.
static inline __m256i to_bf16_bits(vf v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}
#if defined(GF_AVX512_BF16)
// AVX512_BF16's vcvtneps2bf16 rounds the same way (nearest even, a NaN made quiet) in one instruction
// instead of seven, but flushes a denormal input to ±0, which torch's rounding keeps: a vector holding a
// denormal (a gradient below 1.2e-38: rare) takes the integer path, so the bits are torch's on every lane.
static inline __m256i to_16bit(BF16, vf v) {
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) != 0, 0)) return to_bf16_bits(v);  // 0x20: denormal
  return (__m256i)_mm512_cvtneps_pbh(v);
}
#else
static inline __m256i to_16bit(BF16, vf v) { return to_bf16_bits(v); }
#endif
static inline __m256i to_16bit(F16, vf v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

static inline void vstore(F32, float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline void vstore(BF16 d, uint16_t* p, vf v) { _mm256_storeu_si256((__m256i*)p, to_16bit(d, v)); }
static inline void vstore(F16 d, uint16_t* p, vf v) { _mm256_storeu_si256((__m256i*)p, to_16bit(d, v)); }
// Non-temporal (streaming) stores: p aligned to the store's width (W·sizeof(T)); no read of the line
// first. vfence() orders them before the row is handed on (the end of the parallel region).
static inline void vstream(F32, float* p, vf v) { _mm512_stream_ps(p, v); }
static inline void vstream(BF16 d, uint16_t* p, vf v) { _mm256_stream_si256((__m256i*)p, to_16bit(d, v)); }
static inline void vstream(F16 d, uint16_t* p, vf v) { _mm256_stream_si256((__m256i*)p, to_16bit(d, v)); }
static inline void vfence() { _mm_sfence(); }

// ---- e^x (exp_poly.h) -----------------------------------------------------------------------------
static inline vf vexp(vf x) {
  const vf lo = _mm512_set1_ps(EXP_MIN_X);
  const vf xc = _mm512_max_ps(lo, x);  // -inf -> EXP_MIN_X (no inf - inf below); NaN kept (2nd operand)
  const vf n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
  vf q = _mm512_fmadd_ps(_mm512_set1_ps(EXP_C6), r, _mm512_set1_ps(EXP_C5));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_C4));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_C3));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP_C2));
  const vf p = _mm512_add_ps(_mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  // scalef: p·2^n with the exponent range handled in hardware (overflow to +inf included).
  const vf y = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y);  // x < ln(FLT_MIN) -> 0
}
