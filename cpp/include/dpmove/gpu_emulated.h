// Test controls of the emulated GPU provider (gpu.h). Process-wide.
#pragma once

#include <cstdint>

namespace dpmove {
namespace gpu {

// pointer_info().error for an address the emulated provider never handed out: memory the
// caller owns (e.g. an array a test exposes through __cuda_array_interface__), accepted as
// emulated device memory.
constexpr int kForeign = -1;

namespace emulated {
// While stalled no stream runs anything (queued copies stay queued; deadlines then expire).
void stall(bool on);
// The nth operation run from now on (1-based, across all streams) fails with `code` instead
// of running; the next event recorded after it on its stream reports the code. 0 disarms.
void inject(uint64_t nth, int code);
// Operations run so far (copies and launches).
uint64_t ops_run();
}  // namespace emulated

}  // namespace gpu
}  // namespace dpmove
