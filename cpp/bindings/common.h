// Shared helpers of the binding files. Each bind_*.cc registers one concept.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>

namespace py = pybind11;

namespace dpmove {

void bind_errors(py::module_& m);
void bind_region(py::module_& m);
void bind_file(py::module_& m);
void bind_request(py::module_& m);
void bind_engine(py::module_& m);
void bind_net(py::module_& m);
void bind_qos(py::module_& m);  // after bind_engine: adds Engine methods
void bind_verbs(py::module_& m);  // DPMOVE_HAVE_VERBS builds only: private test hooks
void bind_gpu(py::module_& m);    // after bind_engine: device regions, copies
void bind_gpu_kernel(py::module_& m);
void bind_checksum(py::module_& m);  // DPMOVE_HAVE_XXHASH builds: XXH3-64 of buffer ranges

// Wraps `fn` (work that needs the GIL: releasing a Python buffer, a DLPack deleter) so that it
// can run from any thread: at once where the GIL is held, else queued for the main thread
// (a pending call), since the calling thread must not wait for the GIL. Skipped during
// interpreter shutdown (the object is leaked rather than touch a dying interpreter).
std::function<void()> gil_releaser(std::function<void()> fn);
// Runs what gil_releaser queued; call with the GIL held.
void drain_gil_releases();

}  // namespace dpmove
#include "dpmove/qos.h"
namespace dpmove {
// One traffic class from the dict dpmove.qos.QosConfig builds (bind_qos.cc).
qos::ClassConfig qos_class_from(const py::handle& d);
// An arbiter's per-class counters as a dict: bytes, ops, queued, starvation_grants,
// throttled_ns, wait_p50_ns, wait_p99_ns, wait_max_ns (bind_qos.cc).
py::dict qos_stats_dict(const qos::ClassStats& s);

// Seconds (None or float, inf allowed) -> nanoseconds; None -> `none_ns`. ValueError on < 0 or NaN.
inline int64_t seconds_to_ns(const py::object& s, int64_t none_ns, const char* what) {
  if (s.is_none()) return none_ns;
  double v = py::cast<double>(s);
  if (std::isnan(v) || v < 0) throw py::value_error(std::string(what) + " must be >= 0 seconds or None, got " + std::to_string(v));
  if (std::isinf(v) || v >= 9.2e9) return INT64_MAX;
  return static_cast<int64_t>(v * 1e9);
}

// The holder a Python object keeps for a core object whose destructor joins threads (Engine,
// Peer): those threads may need the GIL (a Python buffer's release), so the last reference is
// dropped with the GIL released.
template <class T>
std::shared_ptr<T> release_gil_on_drop(std::shared_ptr<T> core) {
  T* raw = core.get();
  return std::shared_ptr<T>(raw, [core](T*) mutable {
    if (PyGILState_Check()) {
      py::gil_scoped_release nogil;
      core.reset();
    } else {
      core.reset();
    }
  });
}

// Raises the Python exception described by (kind, errno, message, filename) through
// dpmove.errors.from_core; kind is one of "error", "unsupported", "transfer", "timed_out",
// "cancelled".
[[noreturn]] void raise_py(const char* kind, int code, const std::string& msg, const std::string& filename = {});

}  // namespace dpmove
