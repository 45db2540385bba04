// host_emulation.h — TEST-ONLY: just enough of CUDA to run grpo_cuda_kernels.cu on the CPU.
//
// Built only by tests/test_cuda.py (g++ -DGF_HOST_EMULATION), never by setup.py. A launch runs the
// grid's blocks one after another with one std::thread per CUDA thread of the block, so:
//   * __syncthreads is a real barrier over the block's threads (a barrier that not every thread
//     reaches deadlocks here as it hangs on a GPU),
//   * __shfl_xor_sync exchanges values through a buffer between two barriers of the warp,
//   * __shared__ variables are function statics, shared by the block's threads (blocks never
//     overlap, so reusing them across blocks is safe),
//   * bf16/fp16 are bit containers with round-to-nearest-even conversions.
// What this checks: indexing, the aligned head / 16-byte body / tail split of each row sweep,
// reductions, the two sequence-level passes, inplace, the launch plumbing and argument passing.
// What it cannot check: the device's exp2f/expf rounding, the memory model beyond barriers, speed.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <barrier>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline float __fmul_rn(float a, float b) { return a * b; }  // the host compiler does not contract a lone product
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// bf16: the top 16 bits of a float, rounded to nearest even (NaN kept quiet).
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.bits << 16); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

// fp16 through the compiler's _Float16 (IEEE binary16, round to nearest even).
struct __half {
  uint16_t bits;
};
inline __half __float2half_rn(float f) { _Float16 h = (_Float16)f; __half o; memcpy(&o.bits, &h, 2); return o; }
inline float __half2float(__half h) { _Float16 v; memcpy(&v, &h.bits, 2); return (float)v; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

// The runtime API surface the launchers use.
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error (host emulation)"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 0; return cudaSuccess; }
// A small "device" (3 SMs, 256 KB of L2), so that row kernels get fewer blocks than rows and their
// loop over rows is exercised.
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrL2CacheSize };
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrMultiProcessorCount ? 3 : 256 * 1024;
  return cudaSuccess;
}

namespace gf_emu {

inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline double shfl_buf[1024];

// Runs fn() as grid × block CUDA threads; returns when every block is done (launches are synchronous).
template <typename F>
void launch(unsigned grid, unsigned block, F&& fn) {
  if (block == 0 || block > 1024 || block % 32 != 0) throw std::runtime_error("emulated launch: bad block size");
  block_dim = dim3{block, 1, 1};
  grid_dim = dim3{grid, 1, 1};
  std::barrier<> bar((std::ptrdiff_t)block);
  block_barrier = &bar;
  warp_barriers.clear();
  for (unsigned w = 0; w < block / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      thread_idx = dim3{t, 0, 0};
      for (unsigned b = 0; b < grid; ++b) {
        block_idx = dim3{b, 0, 0};
        fn();
        bar.arrive_and_wait();  // no thread starts block b+1 while another still uses shared memory
      }
    });
  }
  for (auto& th : threads) th.join();
  block_barrier = nullptr;
}

}  // namespace gf_emu

#define threadIdx (::gf_emu::thread_idx)
#define blockIdx (::gf_emu::block_idx)
#define blockDim (::gf_emu::block_dim)
#define gridDim (::gf_emu::grid_dim)

inline void __syncthreads() { gf_emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask: every call here is full-warp*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(double), "emulated shuffle of at most 8 bytes");
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  auto& wb = *gf_emu::warp_barriers[warp];
  memcpy(&gf_emu::shfl_buf[t], &v, sizeof(T));
  wb.arrive_and_wait();
  T out;
  memcpy(&out, &gf_emu::shfl_buf[warp * 32 + (lane ^ (unsigned)lane_mask)], sizeof(T));
  wb.arrive_and_wait();
  return out;
}
