// The batched gather/scatter copy kernel. Launch contract: dpmove/batched_copy.h.
//
// Built two ways: by nvcc into a fatbin at build time (cmake/cuda_kernel.cmake), and by NVRTC
// at run time from an embedded copy of this file with the header pasted in place of the
// include below (dpmove::gpu::batched_source()). Nothing else may be included.
#include "dpmove/batched_copy.h"

// descs: n descriptors in device-accessible memory; chunk_bytes: bytes one CTA moves per step
// (a multiple of 16 keeps aligned descriptors on 16-byte vectors; 0 copies nothing).
extern "C" __global__ void __launch_bounds__(dpmove::gpu::kBatchedThreads)
    dpmove_batched_copy(const dpmove::gpu::CopyDesc* descs, unsigned n, unsigned chunk_bytes) {
  __shared__ dpmove::gpu::CopyDesc shared_desc;
  if (blockIdx.x >= n || chunk_bytes == 0) return;  // uniform across the CTA
  if (threadIdx.x == 0) shared_desc = descs[blockIdx.x];
  __syncthreads();
  const dpmove::gpu::CopyDesc d = shared_desc;
  const unsigned long long chunk = chunk_bytes;
  const unsigned long long stride = chunk * gridDim.y;
  for (unsigned long long lo = chunk * blockIdx.y; lo < d.len; lo += stride) {
    const unsigned long long hi = d.len - lo < chunk ? d.len : lo + chunk;
    dpmove::gpu::copy_span(d, lo, hi, threadIdx.x, blockDim.x);
  }
}
