// The batched copy kernel (cpp/cuda/batched_copy.cu, launch contract in batched_copy.h) as the
// build embedded it: a fatbin when nvcc ran at build time, and always its source for NVRTC.
#pragma once

#include <cstddef>
#include <string>

namespace dpmove {
namespace gpu {

// Compiled fatbin when nvcc ran at build time (SASS sm_80, sm_90, plus sm_100 when that nvcc
// knows it; PTX compute_90, plus compute_100 likewise), 16-byte aligned, for
// cuModuleLoadData; *size = its bytes. nullptr with *size = 0 otherwise.
const unsigned char* batched_fatbin(size_t* size) noexcept;

// Why no fatbin was built ("" when it was), e.g. "nvcc not found at build time (...)".
const char* batched_fatbin_missing() noexcept;

// The self-contained CUDA source (header + kernel, no #include) for NVRTC, NUL-terminated.
const char* batched_source() noexcept;

// Compiles batched_source() with NVRTC for `arch` (a virtual architecture, e.g. "compute_90")
// with -std=c++17 -default-device and returns the PTX text (kernel dpmove_batched_copy,
// extern "C"). Each call compiles anew (tens to hundreds of ms): callers cache per device.
// libnvrtc is dlopen'ed on the first call and kept for the process: the path in env
// DPMOVE_NVRTC if set (nothing else is tried then), else libnvrtc.so.12, libnvrtc.so.13,
// libnvrtc.so. Throws
//   UnsupportedError (ENOENT) - libnvrtc could not be loaded or lacks an entry point;
//   UsageError                - NVRTC rejected the options (e.g. an unknown arch); NVRTC's
//                               error string and log in the message;
//   SysError                  - any other NVRTC failure (ENOMEM for NVRTC_ERROR_OUT_OF_MEMORY,
//                               else EIO), with NVRTC's error string and log.
// Thread-safe.
std::string nvrtc_compile_batched(const std::string& arch);

// "not loaded yet (would try: ...)", "loaded <file> (NVRTC <major>.<minor>)", or
// "unusable: <why>". Does not load anything.
std::string nvrtc_status();

}  // namespace gpu
}  // namespace dpmove
