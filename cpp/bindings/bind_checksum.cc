// dpmove._core.checksum: XXH3-64 of byte ranges of a host buffer, the GIL released while hashing.
#include "common.h"
#include "dpmove/checksum.h"

#include <string>

namespace dpmove {

void bind_checksum(py::module_& m) {
  m.def(
      "checksum",
      [](py::buffer buf, py::object rows_obj, py::object seed_obj) {
        // A read-only request: Regions, numpy arrays, bytes and memoryviews all qualify.
        py::buffer_info info = buf.request();
        const auto* base = static_cast<const uint8_t*>(info.ptr);
        const int64_t size = info.size * info.itemsize;
        if (rows_obj.is_none()) {
          const uint64_t seed = py::cast<uint64_t>(seed_obj);
          uint64_t v;
          {
            py::gil_scoped_release nogil;
            v = checksum64(base, static_cast<size_t>(size), seed);
          }
          return py::object(py::int_(v));
        }
        auto rows = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(rows_obj);
        if (!rows || rows.ndim() != 2 || rows.shape(1) != 2)
          throw py::value_error("checksum: rows must be an integer array of shape (N, 2): offset, length in bytes");
        const int64_t n = rows.shape(0);
        const int64_t* r = rows.data();
        for (int64_t i = 0; i < n; ++i) {
          const int64_t off = r[2 * i], len = r[2 * i + 1];
          if (off < 0 || len < 0 || off > size || len > size - off)
            throw py::value_error("checksum: row " + std::to_string(i) + " (offset " + std::to_string(off) + ", length " +
                                  std::to_string(len) + ") lies outside the " + std::to_string(size) + "-byte buffer");
        }
        py::array_t<uint64_t> out(n);
        uint64_t* o = out.mutable_data();
        if (py::isinstance<py::int_>(seed_obj)) {
          const uint64_t seed = py::cast<uint64_t>(seed_obj);
          py::gil_scoped_release nogil;
          checksum_rows(base, r, static_cast<size_t>(n), seed, o);
        } else {
          // One seed per row (the block store seeds each block's checksum with its key).
          auto seeds = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(seed_obj);
          if (!seeds || seeds.ndim() != 1 || seeds.shape(0) != n)
            throw py::value_error("checksum: seed must be an int or a 1-D array of one seed per row (" +
                                  std::to_string(n) + ")");
          const uint64_t* sd = seeds.data();
          py::gil_scoped_release nogil;
          for (int64_t i = 0; i < n; ++i) checksum_rows(base, r + 2 * i, 1, sd[i], o + i);
        }
        return py::object(std::move(out));
      },
      py::arg("buffer"), py::arg("rows") = py::none(), py::arg("seed") = 0,
      "XXH3-64 of a host buffer (rows None: the whole buffer; returns an int), or of each\n"
      "(offset, length) row of an (N, 2) integer array (returns a uint64 array of N); seed is an\n"
      "int, or with rows a uint64 array of one seed per row.\n"
      "Stable across versions: the block store keeps these values on disk.");
}

}  // namespace dpmove
