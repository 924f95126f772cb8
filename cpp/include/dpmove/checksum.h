// Content checksums of KV blocks: XXH3-64 (libxxhash, inlined from its header, so the module
// has no run-time dependency on libxxhash.so). XXH3 runs at memory bandwidth (tens of GB/s on
// one core with SSE2/AVX2), so verifying every block read costs little next to the read itself.
// The value of a given (bytes, seed) never changes: it is part of the block store's on-disk format.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dpmove {

// XXH3-64 of `len` bytes at `data`, with `seed`.
uint64_t checksum64(const void* data, size_t len, uint64_t seed) noexcept;

// out[i] = checksum64(base + rows[2i], rows[2i+1], seed) for i < n. The caller has checked that
// every (offset, length) row lies inside the buffer.
void checksum_rows(const uint8_t* base, const int64_t* rows, size_t n, uint64_t seed, uint64_t* out) noexcept;

}  // namespace dpmove
