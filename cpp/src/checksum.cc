#include "dpmove/checksum.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace dpmove {

uint64_t checksum64(const void* data, size_t len, uint64_t seed) noexcept {
  return XXH3_64bits_withSeed(data, len, seed);
}

void checksum_rows(const uint8_t* base, const int64_t* rows, size_t n, uint64_t seed, uint64_t* out) noexcept {
  for (size_t i = 0; i < n; ++i)
    out[i] = XXH3_64bits_withSeed(base + rows[2 * i], static_cast<size_t>(rows[2 * i + 1]), seed);
}

}  // namespace dpmove
