// grpo_cuda_kernels.cu — the CUDA backend of grpo_fast: the GRPO loss and its gradient in one read
// of the logits.
//
// What it fuses, per token row (b, t) of V logits (one thread block per row at a time):
//   online max / Σexp / Σp·x over z/τ (logsumexp and entropy) → logp → the per-token GRPO terms
//   (grpo_math.h: ratio, loss, KL, clip flags, ∂loss/∂logp) → the gradient
//   g·(1[j=y] − p_j)/τ written in the logits' dtype while the row is still in L2.
// Memory traffic at token level: read the logits once from HBM (sweep 2 rereads them from L2),
// write the gradient once; eager PyTorch reads and writes (B, T, V) tensors about ten times.
//
// Kernels:
//   token_fused_kernel<T>   token level: everything above in one kernel, two sweeps of each row
//   logprob_kernel<T>       lse / logp / entropy only: token_logprobs(), pass 1 of sequence level, and
//                           the forward of grpo_fast.logprobs (per-token τ, the lse kept for backward)
//   logprob_grad_kernel<T>  backward of grpo_fast.logprobs: one read of each row, writes
//                           (g_logp·(1[j=y] − p_j) − g_H·p_j·(log p_j + H))/τ from the saved lse
//                           parts (shift, ln s): log p_j = (x_j − shift) − ln s, never x_j − lse
//   seq_row_kernel          sequence level (GSPO): one block per sequence computes the row's ratio
//                           r_b and Σ_t w·d_ratio, then each token's upstream gradient g_bt
//   seq_grad_kernel<T>      sequence level pass 2: rereads the logits and writes the gradient
//   advantages_kernel       group-relative advantages from rewards (grpo_math.h), batch std first
//   reduce_stats_kernel     per-token (or per-row) partial stats → the stats vector, in a fixed order
//   token_terms_kernel      grpo_math.h token_terms() on arrays (the device-vs-host test only)
// No float atomics anywhere: every reduction has a fixed order, so results are bitwise repeatable.
// Row kernels take a grid sized so that the rows in flight fit in L2 and loop over the rows.
//
// Numerics: fp32 accumulation whatever the logits' dtype; 16-byte vector loads (4 fp32 / 8 bf16 or
// fp16), int64 row offsets; every exponent is a difference x − max scaled once into log2 units,
// so each exponential is one exp2f; the log-prob itself is formed in float64 and rounded once.
// -inf logits give p = 0 and never 0·inf = NaN in Σp·x; NaN logits propagate (fmaxf skips NaN
// but Σexp does not).
//
// Built by setup.py (BEGIN CUDA BUILD) with nvcc -O3 -Xptxas -v for sm_80, sm_90 and the newer
// architectures the installed nvcc knows; linked with the static CUDA runtime, no torch headers.
// Sections: error handling, constants, dtype access, online logsumexp, block reductions, row
// sweeps, kernels, launchers.
#if defined(GF_HOST_EMULATION)
// Test-only: the same source built by the host compiler, one std::thread per CUDA thread
// (csrc/cuda/host_emulation.h), so the kernels' logic runs on machines without a GPU.
#include "host_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cfloat>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "grpo_cuda.h"
#include "grpo_math.h"

namespace grpo_fast {
namespace cuda {

// --- error handling ---------------------------------------------------------------------------

// Every CUDA runtime call goes through this; a failure becomes a Python RuntimeError naming the call.
#define GF_CUDA_CHECK(expr)                                                                          \
  do {                                                                                               \
    const cudaError_t gf_err_ = (expr);                                                              \
    if (gf_err_ != cudaSuccess)                                                                      \
      throw std::runtime_error(std::string("grpo_fast CUDA error: ") + cudaGetErrorString(gf_err_) + \
                               " in " #expr " (" __FILE__ ":" + std::to_string(__LINE__) + ")");    \
  } while (0)

// After every launch: a bad configuration or a missing kernel image (no SASS/PTX for this GPU)
// surfaces here, synchronously, naming the kernel.
static void check_launch(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("grpo_fast CUDA error: launching ") + kernel_name + ": " + cudaGetErrorString(err));
}
#define GF_LAUNCH_CHECK(kernel_name) check_launch(#kernel_name)

// Every kernel launch: kernel<<<grid, block, 0, stream>>>(args...), or a synchronous emulated launch.
#if defined(GF_HOST_EMULATION)
#define GF_LAUNCH(kernel, grid, block, stream, ...) ::gf_emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); })
#else
#define GF_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

// Internal asserts on what Python promised (validation.py already checked the user's input).
#define GF_REQUIRE(cond, what)                                                                \
  do {                                                                                        \
    if (!(cond)) throw std::invalid_argument(std::string("grpo_fast._C_cuda: ") + (what) +    \
                                             " (internal check `" #cond "` failed)");         \
  } while (0)
#define GF_CHECK_PTR(p) GF_REQUIRE((p) != nullptr, #p " must be a device pointer")
#define GF_CHECK_POSITIVE(x) GF_REQUIRE((x) > 0, #x " must be > 0, got " + std::to_string(x))
#define GF_CHECK_GRID(n) GF_REQUIRE((n) <= (int64_t)INT32_MAX, #n " rows exceed the 2^31-1 grid limit: " + std::to_string(n))

// Switch the runtime's current device to the tensors' one for the duration of a call, and back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int cur = 0;
    GF_CUDA_CHECK(cudaGetDevice(&cur));
    if (cur != device) {
      GF_CUDA_CHECK(cudaSetDevice(device));
      prev_ = cur;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);  // best effort: a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// --- constants ----------------------------------------------------------------------------------

constexpr int kWarp = 32;
constexpr int kMaxRowThreads = 512;  // threads per logits row: 16 warps hide HBM latency at V ≥ 32k
constexpr int kSeqThreads = 256;     // sequence-level row kernel: loops over T (B,T)-sized inputs
constexpr int kReduceThreads = 512;  // the final stats reduction (one block)
constexpr int kAdvThreads = 256;     // advantages: one thread per group
constexpr int kUnroll = 4;           // 16-byte loads in flight per thread in a row sweep
constexpr float kLn2 = 0.6931471805599453f;

// --- dtype access -------------------------------------------------------------------------------
// Io<T>: 16-byte vectors of kVec elements <-> floats, and single elements for the unaligned edges.
// bf16 -> f32 is a 16-bit shift; no generic conversion needed.

template <typename T>
struct Io;

template <>
struct Io<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float load1(const float* p) { return *p; }
  static __device__ __forceinline__ void store1(float* p, float v) { *p = v; }
  static __device__ __forceinline__ void unpack(const uint4& r, float* x) {
    x[0] = __uint_as_float(r.x); x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z); x[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
  }
};

template <>
struct Io<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* x) {
    x[0] = __uint_as_float(w << 16);
    x[1] = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(a)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(b)) << 16);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float* x) {
    unpack2(r.x, x); unpack2(r.y, x + 2); unpack2(r.z, x + 4); unpack2(r.w, x + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    return make_uint4(pack2(x[0], x[1]), pack2(x[2], x[3]), pack2(x[4], x[5]), pack2(x[6], x[7]));
  }
};

template <>
struct Io<__half> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float load1(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* x) {
    x[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    x[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    return (uint32_t)__half_as_ushort(__float2half_rn(a)) | ((uint32_t)__half_as_ushort(__float2half_rn(b)) << 16);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float* x) {
    unpack2(r.x, x); unpack2(r.y, x + 2); unpack2(r.z, x + 4); unpack2(r.w, x + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    return make_uint4(pack2(x[0], x[1]), pack2(x[2], x[3]), pack2(x[4], x[5]), pack2(x[6], x[7]));
  }
};

// Elements before the first 16-byte boundary of a row (rows of odd V or strided views are not
// aligned); they and the tail are handled one element at a time, the body with 16-byte loads.
// In-row indices are int32 (V < 2^31 for any vocabulary; the row's base offset is int64): fewer
// registers than 64-bit loop counters, which keeps every sweep spill-free at 64 registers.
template <typename T>
__device__ __forceinline__ int aligned_head(const T* p, int V) {
  const uint32_t mis = (uint32_t)(reinterpret_cast<uintptr_t>(p) & 15u);
  const int head = mis ? (int)((16u - mis) / sizeof(T)) : 0;
  return head < V ? head : V;
}

// --- online logsumexp ---------------------------------------------------------------------------
// State of a partial row: m = max of the raw logits x; s = Σ 2^d and t = Σ 2^d·d with
// d = (x − m)·k2, k2 = log2(e)/τ, so s = Σ exp((x − m)/τ). Then for the row
//   lse = m/τ + ln s,   logp = (x_y − m)/τ − ln s,   entropy = ln s − ln2·t/s,   p_j = 2^(d_j − log2 s).
// The max is kept in logit units and every exponent is a difference x − m (exact when x is near
// m) scaled once: scaling x first would round |x|·k2, an error that grows with the logits' size.
// (t keeps d rather than x for the same reason: no cancellation between lse and Σ p·x.)

struct Lse {
  float m, s, t;
};

__device__ __forceinline__ Lse lse_identity() { return Lse{-FLT_MAX, 0.f, 0.f}; }

// Fold N values into the state: one rescale per N values (N is 1 or kVec).
template <int N>
__device__ __forceinline__ void lse_fold(Lse& a, const float* x, float k2) {
  float cm = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) cm = fmaxf(cm, x[k]);  // skips NaN; a NaN still poisons s below
  if (cm > a.m) {
    const float dm = (a.m - cm) * k2;
    const float sc = exp2f(dm);
    // s == 0: no finite value seen yet, t is 0 too (the guard keeps (-inf)·0 out).
    a.t = a.s > 0.f ? sc * (a.t + dm * a.s) : 0.f;
    a.s *= sc;
    a.m = cm;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = (x[k] - a.m) * k2;
    const float e = exp2f(d);
    a.s += e;
    a.t += e > 0.f ? e * d : 0.f;  // a -inf logit: e = 0, d = -inf; its term is 0, not NaN
  }
}

// Combine two partial states (the warp/block reduction step).
__device__ __forceinline__ Lse lse_merge(const Lse& a, const Lse& b, float k2) {
  const float M = fmaxf(a.m, b.m);
  const float da = (a.m - M) * k2, db = (b.m - M) * k2;
  const float ea = exp2f(da), eb = exp2f(db);
  const float ta = a.s > 0.f ? ea * (a.t + da * a.s) : 0.f;
  const float tb = b.s > 0.f ? eb * (b.t + db * b.s) : 0.f;
  return Lse{M, a.s * ea + b.s * eb, ta + tb};
}

// --- block reductions (fixed order: butterfly in each warp, then warp 0 over the warps) ---------

__device__ __forceinline__ Lse warp_reduce_lse(Lse a, float k2) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    Lse b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, off);
    b.t = __shfl_xor_sync(0xffffffffu, a.t, off);
    a = lse_merge(a, b, k2);
  }
  return a;
}

// All threads get lane 0 of warp 0's result. blockDim.x must be a multiple of 32 (≤ 1024).
__device__ __forceinline__ Lse block_reduce_lse(Lse a, float k2) {
  __shared__ float sh[3][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  a = warp_reduce_lse(a, k2);
  if (lane == 0) { sh[0][warp] = a.m; sh[1][warp] = a.s; sh[2][warp] = a.t; }
  __syncthreads();
  if (warp == 0) {
    Lse b = lane < nwarps ? Lse{sh[0][lane], sh[1][lane], sh[2][lane]} : lse_identity();
    b = warp_reduce_lse(b, k2);
    if (lane == 0) { sh[0][0] = b.m; sh[1][0] = b.s; sh[2][0] = b.t; }
  }
  __syncthreads();
  const Lse out{sh[0][0], sh[1][0], sh[2][0]};
  __syncthreads();  // sh may be reused by the caller's next reduction
  return out;
}

// Sum K values of type Acc over the block; every thread gets the totals in v.
template <int K, typename Acc>
__device__ __forceinline__ void block_sum(Acc* v) {
  __shared__ Acc sh[K][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
    if (lane == 0) sh[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      Acc x = lane < nwarps ? sh[k][lane] : Acc(0);
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
      if (lane == 0) sh[k][0] = x;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = sh[k][0];
  __syncthreads();
}

// --- row sweeps ---------------------------------------------------------------------------------

// Sweep 1: this thread's share of the row's online logsumexp state. k2 = log2(e)/τ.
template <typename T>
__device__ __forceinline__ Lse row_lse(const T* row, int V, float k2) {
  constexpr int VEC = Io<T>::kVec;
  Lse a = lse_identity();
  const int head = aligned_head(row, V);
  const int nvec = (V - head) / VEC;
  const int tail = head + nvec * VEC;
  const int step = blockDim.x;
  for (int j = threadIdx.x; j < head; j += step) {
    const float x = Io<T>::load1(row + j);
    lse_fold<1>(a, &x, k2);
  }
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  int i = threadIdx.x;
  // kUnroll independent 16-byte loads in flight before the exps (the sweep is bandwidth bound);
  // then one vector at a time, so only kVec floats are live next to the raw words.
  for (; i + (kUnroll - 1) * step < nvec; i += kUnroll * step) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) raw[q] = body[i + q * step];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      float x[VEC];
      Io<T>::unpack(raw[q], x);
      lse_fold<VEC>(a, x, k2);
    }
  }
  for (; i < nvec; i += step) {
    float x[VEC];
    Io<T>::unpack(body[i], x);
    lse_fold<VEC>(a, x, k2);
  }
  for (int j = tail + threadIdx.x; j < V; j += step) {
    const float x = Io<T>::load1(row + j);
    lse_fold<1>(a, &x, k2);
  }
  return a;
}

// What sweep 2 needs of a row: p_j = 2^((x_j − m)·k2 − log2 s), and gs = g/τ.
struct RowSoftmax {
  float m, k2, log2s, gs;
};

// d logits_j = gs·(1[j = y] − p_j).
__device__ __forceinline__ float row_value(float x, int j, int y, const RowSoftmax& r) {
  return r.gs * ((j == y ? 1.f : 0.f) - exp2f(fmaf(x - r.m, r.k2, -r.log2s)));
}

// A sweep writing grow[j] = row_value(row[j], j, y, r) for the whole row: element-wise head up to the
// first 16-byte boundary, 16-byte vectors, element-wise tail (when row and grow sit differently
// against 16-byte boundaries, element-wise throughout). `row` and `grow` may be the same memory
// (inplace): each element is read and then written by the same thread. zero: write zeros without
// reading the row (padding, or a token whose upstream gradient is 0). REVERSE: walk the vectors from
// the end of the row (vector i of the loop is vector nvec−1−i; a warp still reads one contiguous span).
// A 16-byte gradient store that streams: st.global.cs (evict-first), so the gradient does not
// push out of L2 the rows other blocks are about to re-read (benchmarks/bytes_model.py). The host
// emulation has no cache: a plain store.
__device__ __forceinline__ void store_streaming(uint4* p, const uint4& v) {
#if defined(GF_HOST_EMULATION)
  *p = v;
#else
  __stcs(p, v);
#endif
}

template <typename T, bool REVERSE, typename R>
__device__ __forceinline__ void row_write(const T* row, T* grow, int V, int y, bool zero, const R& r) {
  constexpr int VEC = Io<T>::kVec;
  const int step = blockDim.x;
  const int head = aligned_head(grow, V);
  if (head != aligned_head(row, V)) {
    for (int j = threadIdx.x; j < V; j += step)
      Io<T>::store1(grow + j, zero ? 0.f : row_value(Io<T>::load1(row + j), j, y, r));
    return;
  }
  const int nvec = (V - head) / VEC;
  const int tail = head + nvec * VEC;
  for (int j = threadIdx.x; j < head; j += step)
    Io<T>::store1(grow + j, zero ? 0.f : row_value(Io<T>::load1(row + j), j, y, r));
  const uint4* in = reinterpret_cast<const uint4*>(row + head);
  uint4* out = reinterpret_cast<uint4*>(grow + head);
  if (zero) {
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);  // +0.0 in every dtype
    for (int i = threadIdx.x; i < nvec; i += step) store_streaming(out + i, z);
  } else {
    int i = threadIdx.x;
    for (; i + (kUnroll - 1) * step < nvec; i += kUnroll * step) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) raw[q] = in[REVERSE ? nvec - 1 - (i + q * step) : i + q * step];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int v = REVERSE ? nvec - 1 - (i + q * step) : i + q * step;
        float x[VEC];
        Io<T>::unpack(raw[q], x);
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[k] = row_value(x[k], head + v * VEC + k, y, r);
        store_streaming(out + v, Io<T>::pack(x));
      }
    }
    for (; i < nvec; i += step) {
      const int v = REVERSE ? nvec - 1 - i : i;
      float x[VEC];
      Io<T>::unpack(in[v], x);
#pragma unroll
      for (int k = 0; k < VEC; ++k) x[k] = row_value(x[k], head + v * VEC + k, y, r);
      store_streaming(out + v, Io<T>::pack(x));
    }
  }
  for (int j = tail + threadIdx.x; j < V; j += step)
    Io<T>::store1(grow + j, zero ? 0.f : row_value(Io<T>::load1(row + j), j, y, r));
}

// Sweep 2: write the row's gradient, after the whole block finished sweep 1. gs == 0 (padding:
// w = 0) writes zeros without reading the row. Backwards through the row: sweep 1 read it forwards,
// so its end is what L2 still holds.
template <typename T>
__device__ __forceinline__ void row_grad(const T* row, T* grow, int V, int y, const RowSoftmax& r) {
  row_write<T, true>(row, grow, V, y, r.gs == 0.f, r);
}

// --- kernels ------------------------------------------------------------------------------------

// What every row kernel reads. Offsets are int64: B·T·V passes 2^31 at real sizes.
struct DevArgs {
  // pointers
  const void* logits;
  void* grad;  // null: no gradient
  const int64_t* ids;
  const float* mask;
  const float* weight;
  const float* adv;  // element (b, t) at adv[b·adv_sb + t·adv_st]: (B,) has adv_st = 0
  const float* old;  // null: on-policy
  const float* ref;  // null: beta == 0
  const float* isr;  // null: 1
  float* logp;       // out (B, T)
  float* entropy;    // out (B, T) or null
  float* rmax;       // out (B, T) or null: each row's max logit (sequence level, for pass 2)
  float* log2s;      // out (B, T) or null: each row's log2 Σ 2^((x − max)·k2)
  float* parts;      // out: per-token (token level) or per-row (sequence level) stats, NUM_STATS each
  float* gbuf;       // sequence level: the upstream gradient g of each token (B, T)
  float* lse;        // out (B, T, 2) or null: each row's lse in two parts, shift = max/τ and ln s
                     // (grpo_fast.logprobs forward); in for logprob_grad_kernel
  const float* tau_rows;  // (B, T) per-token temperatures, or null: tau for every row (logprobs only)
  const float* g_logp;    // logprob_grad_kernel: ∂L/∂logp (B, T) or null (0)
  const float* g_ent;     // logprob_grad_kernel: ∂L/∂entropy (B, T) or null (0); then entropy is read
  // sizes and strides (elements)
  int64_t N, T, V;  // N = B·T token rows
  int64_t stride_b, stride_t, grad_stride_b, grad_stride_t;
  int64_t adv_sb, adv_st, isr_sb, isr_st;
  // options
  LossParams p;
  float k2;   // log2(e)/τ
  double tau;  // τ as Python gave it (p.temperature is its float32 rounding)
  // The entropy bonus: (B, T) w_H (loss −= Σ w_H·H), or null: off. A row with it writes the log-prob
  // backward's row_value (RowLpGrad) with gl = ∂L/∂logp and gh = −w_H.
  const float* ent_w;
};

__device__ __forceinline__ float load_or(const float* p, int64_t i, float dflt) { return p ? p[i] : dflt; }

// A row's reduced state -> (logp, entropy, log2 s), once per row by one thread. The log-prob is
// formed in float64 — an exact x_y − max, one division by the exact τ, ln s — and rounded once:
// at small τ it is of order −V·|x|/τ, where every float32 step would add an ulp of that size.
struct RowStats {
  float logp, entropy, log2s;
};
__device__ __forceinline__ RowStats row_stats(const Lse& st, float xy, double tau) {
  RowStats o;
  o.logp = (float)(((double)xy - (double)st.m) / tau - log((double)st.s));
  o.entropy = logf(st.s) - kLn2 * (st.t / st.s);
  o.log2s = log2f(st.s);
  return o;
}

// A zero gradient row, without reading the logits (a masked row, or g = 0).
template <typename T>
__device__ __forceinline__ void row_zero(T* grow, int V) {
  for (int j = threadIdx.x; j < V; j += blockDim.x) Io<T>::store1(grow + j, 0.f);
}

// Token row (b, t) of the logits and of the gradient (int64 offsets).
template <typename T>
__device__ __forceinline__ const T* logits_row(const DevArgs& a, int64_t b, int64_t t) {
  return static_cast<const T*>(a.logits) + b * a.stride_b + t * a.stride_t;
}
template <typename T>
__device__ __forceinline__ T* grad_row(const DevArgs& a, int64_t b, int64_t t) {
  return static_cast<T*>(a.grad) + b * a.grad_stride_b + t * a.grad_stride_t;
}

// Sweep 1 of a row, the prologue of the row kernels that need its logsumexp: the block's reduced
// online-lse state of x = z/τ (k2 = log2(e)/τ; every thread gets it), and the target's logit in
// thread 0 (*xy; 0 elsewhere), read before any thread can overwrite the row (inplace).
template <typename T>
__device__ __forceinline__ Lse row_sweep(const T* row, int64_t y, int V, float k2, float* xy) {
  *xy = threadIdx.x == 0 ? Io<T>::load1(row + y) : 0.f;
  return block_reduce_lse(row_lse(row, V, k2), k2);
}

// What logprob_grad_kernel needs of a row: log p_j = (x_j·inv_tau − shift) − log_s, the upstream
// gradients and H.
struct RowLpGrad {
  float inv_tau, shift, log_s, gl, gh, H;
};

// ∂L/∂z_j = (g_logp·(1[j = y] − p_j) − g_H·p_j·(log p_j + H))/τ. A −inf logit has p_j = 0 and its
// log p_j is replaced by 0 (never 0·(−inf)); a NaN logit stays NaN.
__device__ __forceinline__ float row_value(float x, int j, int y, const RowLpGrad& r) {
  // no FMA contraction: the forward's rounding of x/τ; x − shift is exact near the max
  const float lp = (__fmul_rn(x, r.inv_tau) - r.shift) - r.log_s;
  const float p = expf(lp);
  const float d = r.gl * ((j == y ? 1.f : 0.f) - p) - r.gh * p * ((p > 0.f ? lp : 0.f) + r.H);
  return d * r.inv_tau;
}

// The log-prob backward's sweep of a row (row_write, forwards). zero: both upstream gradients are 0
// (a token the loss masked out): zeros, the row is not read.
template <typename T>
__device__ __forceinline__ void row_lp_grad(const T* row, T* grow, int V, int y, bool zero, const RowLpGrad& r) {
  row_write<T, false>(row, grow, V, y, zero, r);
}

// The fused loss's row with the entropy bonus, as a log-prob backward row: from the row max m (logit
// units) and log2 s of sweep 1, the lse parts are formed as logprob_kernel stores them (shift = m·(1/τ),
// ln s), then row_value(RowLpGrad) writes (gl·(1[j = y] − p_j) − gh·p_j·(log p_j + H))/τ.
__device__ __forceinline__ RowLpGrad ent_row(float m, float log2s, double tau, float gl, float gh, float H) {
  const float inv_tau = (float)(1.0 / tau);
  return RowLpGrad{inv_tau, __fmul_rn(m, inv_tau), log2s * kLn2, gl, gh, H};
}

// Token level: one block per token row at a time (blocks loop over rows, see row_grid()): logp,
// the token's stats and (when asked) its gradient row. A masked row (m = 0) is not read: zeros,
// a zero gradient row (a NaN in it does not reach the loss). m is the block's: the branch is uniform.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads) token_fused_kernel(const DevArgs a) {
  __shared__ float sh_bcast[4];  // log2 s, g/τ; with the entropy bonus also H, −w_H
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const int64_t b = n / a.T, t = n - b * a.T;
    if (a.mask[n] == 0.f) {
      if (threadIdx.x == 0) {
        a.logp[n] = 0.f;
        for (int k = 0; k < NUM_STATS; ++k) a.parts[n * NUM_STATS + k] = 0.f;
      }
      if (a.grad != nullptr) row_zero(grad_row<T>(a, b, t), (int)a.V);
      continue;
    }
    const T* row = logits_row<T>(a, b, t);
    const int64_t y = a.ids[n];
    float xy;
    const Lse st = row_sweep(row, y, (int)a.V, a.k2, &xy);

    if (threadIdx.x == 0) {
      const RowStats rs = row_stats(st, xy, a.tau);
      const float logp = rs.logp, ent = rs.entropy;
      a.logp[n] = logp;
      const float m = a.mask[n], w = a.weight[n];
      const float A = a.adv[b * a.adv_sb + t * a.adv_st];
      const float isr = a.isr ? a.isr[b * a.isr_sb + t * a.isr_st] : 1.f;
      const float ref = load_or(a.ref, n, 0.f);
      // On-policy (old = logp.detach()): r = exp(logp − logp) = 1, dr/dlogp = r = 1 — and NaN for a
      // NaN/inf log-prob, as the reference gives.
      const float r = expf(logp - (a.old ? a.old[n] : logp));
      const TokenTerms o = token_terms(a.p, logp, ref, A, isr, r);
      float part[NUM_STATS] = {};
      const float ew = load_or(a.ent_w, n, 0.f);
      part[STAT_LOSS] = w * o.loss - ew * ent;
      part[STAT_ENTROPY] = m * ent;
      part[STAT_KL] = m * o.kl;
      count_flags(part, o.clip_low, o.clip_high, o.cispo_clip, flag_weight(TOKEN, a.adv_st != 0, t, m));
#pragma unroll
      for (int k = 0; k < NUM_STATS; ++k) a.parts[n * NUM_STATS + k] = part[k];
      sh_bcast[0] = rs.log2s;
      sh_bcast[1] = w * (o.d_logp + r * o.d_ratio) / a.p.temperature;  // g/τ; dr/dlogp = r at token level
      sh_bcast[2] = ent;
      sh_bcast[3] = -ew;
    }
    if (a.grad != nullptr) {
      __syncthreads();
      if (a.ent_w != nullptr)  // the entropy bonus: the log-prob backward's row, gl = g, gh = −w_H (backwards)
        row_write<T, true>(row, grad_row<T>(a, b, t), (int)a.V, (int)y, false,
                           ent_row(st.m, sh_bcast[0], a.tau, sh_bcast[1] * a.p.temperature, sh_bcast[3], sh_bcast[2]));
      else
        row_grad(row, grad_row<T>(a, b, t), (int)a.V, (int)y, RowSoftmax{st.m, a.k2, sh_bcast[0], sh_bcast[1]});
    }
    // Next row: thread 0 rewrites sh_bcast only after the next reduction's barriers, which every
    // thread reaches after it has read sh_bcast above.
  }
}

// lse, logp and entropy of one token row per block (token_logprobs; sequence level pass 1).
// With a.mask (the fused loss's sequence-level pass 1; token_logprobs / grpo_fast.logprobs with a mask)
// a masked row is not read: all outputs 0.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads) logprob_kernel(const DevArgs a) {
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const int64_t b = n / a.T, t = n - b * a.T;
    if (a.mask != nullptr && a.mask[n] == 0.f) {
      if (threadIdx.x == 0) {
        a.logp[n] = 0.f;
        if (a.entropy) a.entropy[n] = 0.f;
        if (a.rmax) a.rmax[n] = 0.f;
        if (a.log2s) a.log2s[n] = 0.f;
        if (a.lse) a.lse[2 * n] = a.lse[2 * n + 1] = 0.f;
      }
      continue;
    }
    // Per-token temperature (grpo_fast.logprobs with a τ tensor): every thread reads the row's τ.
    const double tau = a.tau_rows ? (double)a.tau_rows[n] : a.tau;
    const float k2 = a.tau_rows ? (float)(1.4426950408889634 / tau) : a.k2;
    float xy;
    const Lse st = row_sweep(logits_row<T>(a, b, t), a.ids[n], (int)a.V, k2, &xy);
    if (threadIdx.x == 0) {
      const RowStats rs = row_stats(st, xy, tau);
      a.logp[n] = rs.logp;
      if (a.entropy) a.entropy[n] = rs.entropy;
      if (a.rmax) a.rmax[n] = st.m;
      if (a.log2s) a.log2s[n] = rs.log2s;
      // The lse in two parts, as logprob_grad_kernel uses them: log p = (x·(1/τ) rounded − shift) − ln s.
      // The max entry then gets log p = −ln s exactly in float32 (0 when it is the only finite logit,
      // e.g. V = 1), and no x − lse is ever formed: at |x| ~ 1e4 that difference would lose an ulp
      // of 1e4 (~1e-3) even for logits that spread over a few units around a common offset.
      if (a.lse) {
        a.lse[2 * n] = __fmul_rn(st.m, (float)(1.0 / tau));
        a.lse[2 * n + 1] = logf(st.s);
      }
    }
  }
}

// Backward of grpo_fast.logprobs: one block per token row at a time, one read of the row (the saved
// lse parts give p_j without a reduction), one write of its gradient.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads) logprob_grad_kernel(const DevArgs a) {
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const int64_t b = n / a.T, t = n - b * a.T;
    const T* row = logits_row<T>(a, b, t);
    T* grow = grad_row<T>(a, b, t);
    const float gl = load_or(a.g_logp, n, 0.f), gh = load_or(a.g_ent, n, 0.f);
    const bool zero = gl == 0.f && gh == 0.f;
    RowLpGrad r{0.f, 0.f, 0.f, gl, gh, 0.f};
    if (!zero) {
      r.inv_tau = a.tau_rows ? (float)(1.0 / (double)a.tau_rows[n]) : (float)(1.0 / a.tau);
      r.shift = a.lse[2 * n];
      r.log_s = a.lse[2 * n + 1];
      r.H = gh != 0.f ? a.entropy[n] : 0.f;
    }
    row_lp_grad(row, grow, (int)a.V, (int)a.ids[n], zero, r);
  }
}

// Sequence level (GSPO): one block per sequence b. r_b = exp(Σ_t m(logp − old) / max(Σm, 1));
// the token terms with the row's ratio; g_bt = w·d_logp + r_b·m/max(Σm,1)·Σ_t w·d_ratio into gbuf;
// the row's stats (sums over t) into parts[b].
__global__ void __launch_bounds__(kSeqThreads) seq_row_kernel(const DevArgs a) {
  const int64_t b = blockIdx.x, base = b * a.T;
  float len_sum[2] = {0.f, 0.f};  // Σ m, Σ m·(logp − old)
  for (int64_t t = threadIdx.x; t < a.T; t += blockDim.x) {
    const float m = a.mask[base + t];
    if (m == 0.f) continue;  // masked: skipped, not multiplied by 0
    len_sum[0] += m;
    const float lp = a.logp[base + t];
    len_sum[1] += m * (lp - (a.old ? a.old[base + t] : lp));  // on-policy: 0, or NaN for a NaN logp
  }
  block_sum<2, float>(len_sum);
  const float inv_len = 1.f / fmaxf(len_sum[0], 1.f);
  const float r = expf(len_sum[1] * inv_len);

  // acc: the seven stats, then S = Σ_t w·d_ratio.
  float acc[NUM_STATS] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t t = threadIdx.x; t < a.T; t += blockDim.x) {
    const int64_t n = base + t;
    const float m = a.mask[n], w = a.weight[n];
    // With a per-row advantage the row's flags count once, on its first token, masked or not.
    const float fw = flag_weight(SEQUENCE, a.adv_st != 0, t, m);
    if (m == 0.f && fw == 0.f) {  // masked: skipped (its g is 0)
      if (a.gbuf) a.gbuf[n] = 0.f;
      continue;
    }
    const bool valid = m != 0.f;
    const float A = a.adv[b * a.adv_sb + t * a.adv_st];
    const float isr = a.isr ? a.isr[b * a.isr_sb + t * a.isr_st] : 1.f;
    const TokenTerms o = token_terms(a.p, valid ? a.logp[n] : 0.f, valid ? load_or(a.ref, n, 0.f) : 0.f, A, isr, r);
    count_flags(acc, o.clip_low, o.clip_high, o.cispo_clip, fw);
    if (!valid) {
      if (a.gbuf) a.gbuf[n] = 0.f;
      continue;
    }
    acc[STAT_LOSS] += w * o.loss - load_or(a.ent_w, n, 0.f) * a.entropy[n];
    acc[STAT_ENTROPY] += m * a.entropy[n];
    acc[STAT_KL] += m * o.kl;
    acc[NUM_STATS - 1] += w * o.d_ratio;
    if (a.gbuf) a.gbuf[n] = w * o.d_logp;
  }
  block_sum<NUM_STATS, float>(acc);
  if (a.gbuf) {
    // dr_b/dlogp_t = r_b·m_t/max(Σm, 1); each thread revisits the tokens it wrote above.
    const float c = r * inv_len * acc[NUM_STATS - 1];
    for (int64_t t = threadIdx.x; t < a.T; t += blockDim.x)
      if (a.mask[base + t] != 0.f) a.gbuf[base + t] += c * a.mask[base + t];
  }
  if (threadIdx.x == 0) {
    float* out = a.parts + b * NUM_STATS;
#pragma unroll
    for (int k = 0; k < NUM_STATS - 1; ++k) out[k] = acc[k];
    out[NUM_STATS - 1] = 0.f;
  }
}

// Sequence level pass 2: one block per token row, the gradient from pass 1's row max, log2 s and g.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads) seq_grad_kernel(const DevArgs a) {
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const int64_t b = n / a.T, t = n - b * a.T;
    const T* row = logits_row<T>(a, b, t);
    T* grow = grad_row<T>(a, b, t);
    const float ew = load_or(a.ent_w, n, 0.f);
    if (a.gbuf[n] == 0.f && ew == 0.f) {  // a masked row (or g = 0): zeros, the row is not read
      row_zero(grow, (int)a.V);
      continue;
    }
    if (ew != 0.f)  // the entropy bonus: the log-prob backward's row, gl = g, gh = −w_H
      row_write<T, false>(row, grow, (int)a.V, (int)a.ids[n], false,
                          ent_row(a.rmax[n], a.log2s[n], a.tau, a.gbuf[n], -ew, a.entropy[n]));
    else
      row_grad(row, grow, (int)a.V, (int)a.ids[n], RowSoftmax{a.rmax[n], a.k2, a.log2s[n], a.gbuf[n] / a.p.temperature});
  }
}

// Advantages (B,) from rewards: thread 0 takes the batch std first (scale_rewards="batch"), then one
// thread per group of G. float64 statistics, exactly grpo_math.h's (shared with the CPU backend).
__global__ void __launch_bounds__(kAdvThreads)
advantages_kernel(const float* rewards, int64_t B, int64_t G, int32_t scale, double adv_eps, float* out) {
  __shared__ double batch_std;
  if (threadIdx.x == 0) batch_std = scale == SCALE_BATCH ? unbiased_std(rewards, B) : 0.0;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < B / G; k += blockDim.x)
    group_advantages_of_group(rewards, k, G, scale, adv_eps, batch_std, out);
}

// stats[k] = Σ_i parts[i][k] in float64, fixed order (per-thread strided sums, then the block tree).
__global__ void __launch_bounds__(kReduceThreads) reduce_stats_kernel(const float* parts, int64_t n, float* stats) {
  constexpr int K = NUM_STATS - 1;
  double acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    // parts rows are NUM_STATS = 8 floats, 32-byte aligned (scratch layout): two 16-byte loads.
    const float4 lo = reinterpret_cast<const float4*>(parts + i * NUM_STATS)[0];
    const float4 hi = reinterpret_cast<const float4*>(parts + i * NUM_STATS)[1];
    acc[0] += lo.x; acc[1] += lo.y; acc[2] += lo.z; acc[3] += lo.w;
    acc[4] += hi.x; acc[5] += hi.y; acc[6] += hi.z;
  }
  block_sum<K, double>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) stats[k] = (float)acc[k];
    stats[NUM_STATS - 1] = 0.f;
  }
}

// token_terms() on arrays: the device half of the host/device consistency check.
__global__ void token_terms_kernel(const LossParams p, int64_t n, const float* logp, const float* ref, const float* adv,
                                   const float* isr, const float* ratio, float* out) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const TokenTerms o = token_terms(p, logp[i], ref[i], adv[i], isr[i], ratio[i]);
  float* row = out + i * kTermCols;
  row[0] = o.loss; row[1] = o.kl; row[2] = o.d_logp; row[3] = o.d_ratio;
  row[4] = o.clip_low ? 1.f : 0.f; row[5] = o.clip_high ? 1.f : 0.f; row[6] = o.cispo_clip ? 1.f : 0.f;
}

// --- launchers ----------------------------------------------------------------------------------

// Threads per row: grow by warps until each thread has ≥ 8 vectors, so small V does not idle 16
// warps and large V gets 16 warps of loads in flight.
template <typename T>
int row_threads(int64_t V) {
  const int64_t nvec = (V + Io<T>::kVec - 1) / Io<T>::kVec;
  int threads = kWarp;
  while (threads < kMaxRowThreads && (int64_t)threads * 8 < nvec) threads *= 2;
  return threads;
}

// Scratch layout (floats), each piece rounded up to 64 floats (256 bytes) so that every piece is
// aligned for vector loads.
struct Scratch {
  int64_t adv = 0, parts = 0, rmax = 0, log2s = 0, entropy = 0, gbuf = 0, total = 0;
};

static int64_t round_up(int64_t x) { return (x + 63) / 64 * 64; }

static Scratch scratch_layout(int64_t B, int64_t T, int32_t level, bool has_rewards, bool want_grad) {
  Scratch s;
  int64_t off = 0;
  const int64_t N = B * T;
  if (has_rewards) { s.adv = off; off += round_up(B); }
  s.parts = off;
  off += round_up((level == TOKEN ? N : B) * NUM_STATS);
  if (level == SEQUENCE) {
    s.rmax = off; off += round_up(N);
    s.log2s = off; off += round_up(N);
    s.entropy = off; off += round_up(N);
    if (want_grad) { s.gbuf = off; off += round_up(N); }
  }
  s.total = off;
  return s;
}

int64_t fused_scratch_floats(int64_t B, int64_t T, int32_t level, bool has_rewards, bool want_grad) {
  return scratch_layout(B, T, level, has_rewards, want_grad).total;
}

// SM count and L2 size of a device, queried once per device.
struct DeviceInfo {
  int sms = 0, l2_bytes = 0;
};

static DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  if ((int)cache.size() <= device) cache.resize(device + 1);
  DeviceInfo& di = cache[device];
  if (di.sms == 0) {
    GF_CUDA_CHECK(cudaDeviceGetAttribute(&di.l2_bytes, cudaDevAttrL2CacheSize, device));
    GF_CUDA_CHECK(cudaDeviceGetAttribute(&di.sms, cudaDevAttrMultiProcessorCount, device));
  }
  return di;
}

// Blocks of a row kernel (each loops over rows n = blockIdx.x, + gridDim.x, ...). A block holds its
// row between sweep 1 and sweep 2, and the blocks start in step, so the rows in flight are the
// blocks in flight: keep them within 3/4 of L2 so that the reverse sweep 2 rereads from L2, not
// HBM — one read + one write per logit (benchmarks/bytes_model.py, which mirrors this rule as
// cuda_grid()). That can mean fewer blocks than SMs (fp32 rows of a 152k vocabulary: 608 KB, 64
// blocks on an H100); when not even one row fits, all max_per_sm blocks per SM. two_sweeps = false
// (one read of each row): only the cap of max_per_sm blocks per SM.
static unsigned row_grid(int64_t N, int64_t row_bytes, int device, bool two_sweeps) {
  constexpr int64_t kMaxPerSm = 16;
  const DeviceInfo di = device_info(device);
  const int64_t sms = di.sms > 0 ? di.sms : 1;
  const int64_t cap = sms * kMaxPerSm;
  int64_t grid = cap;
  if (two_sweeps) {
    const int64_t fit = ((int64_t)di.l2_bytes * 3 / 4) / (row_bytes > 0 ? row_bytes : 1);
    if (fit >= 1 && fit < cap) grid = fit;
  }
  return (unsigned)(N < grid ? N : grid);
}

// A row kernel over the d.N token rows: row_grid() blocks (each loops over rows) of row_threads<T>(V)
// threads. two_sweeps: the kernel rereads its row after the block's reduction (token level with a
// gradient), so the rows in flight must fit in L2.
template <typename T>
static void launch_rows(void (*kernel)(const DevArgs), const char* name, const DevArgs& d, int device,
                        cudaStream_t stream, bool two_sweeps) {
  const unsigned grid = row_grid(d.N, d.V * (int64_t)sizeof(T), device, two_sweeps);
  GF_LAUNCH(kernel, grid, row_threads<T>(d.V), stream, d);
  check_launch(name);
}

// Calls f.template operator()<T>() with the logits' element type.
template <typename F>
static void dispatch_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case DTYPE_F32: f(float{}); break;
    case DTYPE_BF16: f(__nv_bfloat16{}); break;
    case DTYPE_F16: f(__half{}); break;
    default: throw std::invalid_argument("grpo_fast._C_cuda: unknown logits dtype code " + std::to_string(dtype));
  }
}

static void check_logits(const LogitsView& l) {
  GF_CHECK_PTR(l.ptr);
  GF_CHECK_POSITIVE(l.B);
  GF_CHECK_POSITIVE(l.T);
  GF_CHECK_POSITIVE(l.V);
  GF_REQUIRE(l.V <= (int64_t)INT32_MAX, "V must fit in int32 (in-row indices), got " + std::to_string(l.V));
  GF_CHECK_GRID(l.B);  // seq_row_kernel: one block per sequence (row kernels loop, any B·T)
}

// The row kernels' arguments with the logits view, the ids, τ (and k2 = log2(e)/τ) filled in, the
// rest null / 0. grad: the gradient rows (pointer and B/T strides), or null.
static DevArgs dev_args(const LogitsView& l, const int64_t* ids, double temperature, void* grad, int64_t grad_stride_b,
                        int64_t grad_stride_t) {
  DevArgs d{};
  d.logits = l.ptr;
  d.ids = ids;
  d.N = l.B * l.T;
  d.T = l.T;
  d.V = l.V;
  d.stride_b = l.stride_b;
  d.stride_t = l.stride_t;
  d.grad = grad;
  d.grad_stride_b = grad_stride_b;
  d.grad_stride_t = grad_stride_t;
  d.tau = temperature;
  d.k2 = (float)(1.4426950408889634 / temperature);
  return d;
}

void fused_loss(const LossArgs& f, const Context& c) {
  // 1. check what Python promised
  const LogitsView& l = f.logits;
  check_logits(l);
  GF_CHECK_PTR(f.ids);
  GF_CHECK_PTR(f.mask);
  GF_CHECK_PTR(f.weight);
  GF_CHECK_PTR(f.logp);
  GF_CHECK_PTR(f.stats);
  GF_CHECK_PTR(c.scratch);
  GF_REQUIRE((f.advantages != nullptr) != (f.rewards != nullptr), "exactly one of advantages and rewards");
  GF_REQUIRE(f.rewards == nullptr || (f.group_size >= 2 && l.B % f.group_size == 0), "group_size must divide B");
  GF_REQUIRE(f.params.beta == 0.f || f.ref_logp != nullptr, "ref_logp is needed when beta != 0");
  GF_REQUIRE(f.params.level == TOKEN || f.params.level == SEQUENCE, "level must be 0 or 1");
  GF_REQUIRE(f.params.temperature > 0.f && f.temperature > 0.0, "temperature must be > 0");
  const int64_t B = l.B, T = l.T, N = B * T;
  const bool want_grad = f.grad != nullptr;
  const Scratch S = scratch_layout(B, T, f.params.level, f.rewards != nullptr, want_grad);
  GF_REQUIRE(c.scratch_floats >= S.total, "scratch needs " + std::to_string(S.total) + " floats");

  DeviceGuard guard(c.device);
  cudaStream_t stream = static_cast<cudaStream_t>(c.stream);

  DevArgs d = dev_args(l, f.ids, f.temperature, f.grad, f.grad_stride_b, f.grad_stride_t);
  d.mask = f.mask;
  d.weight = f.weight;
  d.old = f.old_logp;
  d.ref = f.params.beta != 0.f ? f.ref_logp : nullptr;
  d.isr = f.isr;
  d.logp = f.logp;
  d.isr_sb = f.isr_per_token ? T : 1;
  d.isr_st = f.isr_per_token ? 1 : 0;
  d.p = f.params;
  d.parts = c.scratch + S.parts;
  d.ent_w = f.entropy_weight;

  // 2. advantages: given, or from rewards in a one-block kernel ("fused advantage broadcast": a
  //    (B,) vector, never a (B, T) tensor)
  if (f.rewards) {
    float* adv = c.scratch + S.adv;
    GF_LAUNCH(advantages_kernel, 1, kAdvThreads, stream, f.rewards, B, f.group_size, f.scale_rewards, f.adv_eps, adv);
    GF_LAUNCH_CHECK(advantages_kernel);
    d.adv = adv;
    d.adv_sb = 1;
    d.adv_st = 0;
  } else {
    d.adv = f.advantages;
    d.adv_sb = f.adv_per_token ? T : 1;
    d.adv_st = f.adv_per_token ? 1 : 0;
  }

  // 3. the passes over the logits
  if (f.params.level == TOKEN) {
    dispatch_dtype(l.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_rows<T>(token_fused_kernel<T>, "token_fused_kernel", d, c.device, stream, want_grad);
    });
    GF_LAUNCH(reduce_stats_kernel, 1, kReduceThreads, stream, d.parts, N, f.stats);
    GF_LAUNCH_CHECK(reduce_stats_kernel);
    return;
  }
  d.rmax = c.scratch + S.rmax;
  d.log2s = c.scratch + S.log2s;
  d.entropy = c.scratch + S.entropy;
  d.gbuf = want_grad ? c.scratch + S.gbuf : nullptr;
  dispatch_dtype(l.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_rows<T>(logprob_kernel<T>, "logprob_kernel", d, c.device, stream, false);
  });
  GF_LAUNCH(seq_row_kernel, (unsigned)B, kSeqThreads, stream, d);
  GF_LAUNCH_CHECK(seq_row_kernel);
  if (want_grad)
    dispatch_dtype(l.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_rows<T>(seq_grad_kernel<T>, "seq_grad_kernel", d, c.device, stream, false);
    });
  GF_LAUNCH(reduce_stats_kernel, 1, kReduceThreads, stream, d.parts, B, f.stats);
  GF_LAUNCH_CHECK(reduce_stats_kernel);
}

void token_logprobs(const LogprobArgs& a, const Context& c) {
  check_logits(a.logits);
  GF_CHECK_PTR(a.ids);
  GF_CHECK_PTR(a.logp);
  GF_REQUIRE(a.tau_rows != nullptr || a.temperature > 0.f, "temperature must be > 0");
  DeviceGuard guard(c.device);
  DevArgs d = dev_args(a.logits, a.ids, a.temperature, nullptr, 0, 0);
  d.mask = a.mask;  // null: every row
  d.logp = a.logp;
  d.entropy = a.entropy;
  d.lse = a.lse;
  d.tau_rows = a.tau_rows;
  d.p.temperature = (float)a.temperature;
  cudaStream_t stream = static_cast<cudaStream_t>(c.stream);
  dispatch_dtype(a.logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_rows<T>(logprob_kernel<T>, "logprob_kernel", d, c.device, stream, false);
  });
}

void logprobs_backward(const LogprobGradArgs& a, const Context& c) {
  check_logits(a.logits);
  GF_CHECK_PTR(a.grad);
  GF_CHECK_PTR(a.ids);
  GF_CHECK_PTR(a.lse);
  GF_REQUIRE(a.g_entropy == nullptr || a.entropy != nullptr, "the entropy gradient needs the saved entropy");
  GF_REQUIRE(a.tau_rows != nullptr || a.temperature > 0.0, "temperature must be > 0");
  DeviceGuard guard(c.device);
  DevArgs d = dev_args(a.logits, a.ids, a.temperature, a.grad, a.grad_stride_b, a.grad_stride_t);
  d.entropy = const_cast<float*>(a.entropy);  // read only (DevArgs' entropy is an output elsewhere)
  d.lse = const_cast<float*>(a.lse);          // read only here
  d.tau_rows = a.tau_rows;
  d.g_logp = a.g_logp;
  d.g_ent = a.g_entropy;
  cudaStream_t stream = static_cast<cudaStream_t>(c.stream);
  dispatch_dtype(a.logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_rows<T>(logprob_grad_kernel<T>, "logprob_grad_kernel", d, c.device, stream, false);
  });
}

void token_terms_host(const LossParams& p, int64_t n, const float* logp, const float* ref, const float* adv,
                      const float* isr, const float* ratio, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const TokenTerms o = token_terms(p, logp[i], ref[i], adv[i], isr[i], ratio[i]);
    float* row = out + i * kTermCols;
    row[0] = o.loss; row[1] = o.kl; row[2] = o.d_logp; row[3] = o.d_ratio;
    row[4] = o.clip_low ? 1.f : 0.f; row[5] = o.clip_high ? 1.f : 0.f; row[6] = o.cispo_clip ? 1.f : 0.f;
  }
}

void token_terms_device(const LossParams& p, int64_t n, const float* logp, const float* ref, const float* adv,
                        const float* isr, const float* ratio, float* out, int32_t device, void* stream) {
  GF_CHECK_POSITIVE(n);
  DeviceGuard guard(device);
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  GF_CHECK_GRID(blocks);
  GF_LAUNCH(token_terms_kernel, (unsigned)blocks, threads, static_cast<cudaStream_t>(stream), p, n, logp, ref, adv, isr, ratio, out);
  GF_LAUNCH_CHECK(token_terms_kernel);
}

int32_t runtime_version() {
  int v = 0;
  GF_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

int32_t device_count(const char** why_not) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: "no device" is an answer here, not a failure
    if (why_not) *why_not = cudaGetErrorString(err);
    return 0;
  }
  if (why_not) *why_not = nullptr;
  return n;
}

}  // namespace cuda
}  // namespace grpo_fast
