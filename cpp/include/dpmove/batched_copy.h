// The batched gather/scatter copy: one launch moves many Layer Blocks between pinned host
// memory mapped into the device's address space and device memory.
//
// Shared by the CUDA kernel (cpp/cuda/batched_copy.cu, built with nvcc or NVRTC) and by the
// emulated device, which runs the same span walk on a CPU thread, so the descriptor building
// and chunking that the GPU path uses are exercised on hosts without a GPU.
//
// Launch contract (kernel dpmove_batched_copy(descs, n, chunk_bytes)):
//   descs        device-accessible array of n CopyDesc (the backend keeps it in pinned, mapped
//                host memory until the launch's completion event fires);
//   grid         x = n (one column per descriptor), y = min(ceil(max len / chunk_bytes), 65535);
//                CTA (x, y) copies chunks y, y + gridDim.y, ... of descriptor x;
//   block        kBatchedThreads threads.
// Descriptors must not overlap one another's destination; src and dst of one descriptor must
// not overlap. No header from the C++ or CUDA standard library is used, so NVRTC compiles it
// without include paths.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DPMOVE_HD __host__ __device__ __forceinline__
#else
#define DPMOVE_HD inline
#endif

namespace dpmove {
namespace gpu {

// One block copy; addresses are device-accessible (host side: the mapped alias). 24 bytes.
struct CopyDesc {
  unsigned long long dst;
  unsigned long long src;
  unsigned long long len;  // bytes
};

constexpr unsigned kBatchedThreads = 256;
// Default bytes one CTA moves per step: 16 KiB = 256 threads x 4 x 16-byte vectors.
constexpr unsigned kBatchedChunk = 16384;

// alignas(16): without it the copy compiles to four 4-byte accesses instead of one 16-byte one.
struct alignas(16) Vec16 {
  unsigned int a, b, c, d;
};

// Copies bytes [lo, hi) of `d`, this worker taking every `lanes`-th unit starting at `lane`.
// Units are 16-byte vectors when src, dst and lo are 16-byte aligned (the tail of a length
// that is not a multiple of 16 then goes byte by byte), else single bytes.
DPMOVE_HD void copy_span(const CopyDesc& d, unsigned long long lo, unsigned long long hi, unsigned lane,
                         unsigned lanes) {
  if (((d.dst | d.src | lo) & 15ull) == 0) {
    Vec16* dst = reinterpret_cast<Vec16*>(d.dst + lo);
    const Vec16* src = reinterpret_cast<const Vec16*>(d.src + lo);
    const unsigned long long n = (hi - lo) >> 4;
    for (unsigned long long i = lane; i < n; i += lanes) dst[i] = src[i];
    lo += n << 4;
  }
  unsigned char* dst = reinterpret_cast<unsigned char*>(d.dst);
  const unsigned char* src = reinterpret_cast<const unsigned char*>(d.src);
  for (unsigned long long i = lo + lane; i < hi; i += lanes) dst[i] = src[i];
}

// Grid y extent for descriptors whose longest is max_len bytes.
DPMOVE_HD unsigned batched_grid_y(unsigned long long max_len, unsigned chunk) {
  unsigned long long y = (max_len + chunk - 1) / chunk;
  if (y == 0) y = 1;
  return y > 65535ull ? 65535u : static_cast<unsigned>(y);
}

}  // namespace gpu
}  // namespace dpmove
