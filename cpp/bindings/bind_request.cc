#include <cerrno>

#include "common.h"
#include "dpmove/engine.h"
#include "dpmove/file.h"
#include "dpmove/request.h"
#include "dpmove/status.h"

namespace dpmove {

namespace {

std::string describe_req(const Request& r) {
  return "request " + std::to_string(r.id()) + " (" + op_name(r.op()) + " '" + r.target() + "', " +
         std::to_string(r.size()) + " entries)";
}

std::string entry_failure(const Request& r, int64_t i, int32_t st, int* code) {
  const IoEntry& e = r.entry(static_cast<size_t>(i));
  std::string where = "entry " + std::to_string(i) + (r.op() == OpKind::kPut ? " (remote_offset=" : r.device() ? " (device_offset=" : " (file_offset=") + std::to_string(e.file_offset) +
                      (r.device() ? ", host_offset=" : ", region_offset=") + std::to_string(e.region_offset) + ", length=" + std::to_string(e.length) + ")";
  std::vector<int64_t> bytes(r.size());
  r.copy_bytes(bytes.data());
  if (st == kEntryShort) {
    *code = ENODATA;
    return where + ": short read, end of file after " + std::to_string(bytes[i]) + " of " + std::to_string(e.length) + " bytes";
  }
  *code = -st;
  return where + ": " + errno_str(-st) + (bytes[i] ? " after " + std::to_string(bytes[i]) + " bytes" : "");
}

// Raises the exception that matches the request's outcome; returns when it is kDone.
void check(const Request& r) {
  ReqState s = r.state();
  if (s == ReqState::kDone) return;
  if (s == ReqState::kPending) throw py::value_error(describe_req(r) + " is still pending; wait() first");
  std::string counts = std::to_string(r.size() - r.failed() - r.unfinished()) + " of " + std::to_string(r.size()) + " entries done";
  if (s == ReqState::kTimedOut || s == ReqState::kCancelled) {
    std::string msg = describe_req(r) + (s == ReqState::kTimedOut ? " missed its deadline: " : " was cancelled: ") + counts;
    int64_t running = r.running();
    msg += running ? ", " + std::to_string(running) + " still running (wait_quiesced() before reusing the buffers)"
                   : ", none running";
    raise_py(s == ReqState::kTimedOut ? "timed_out" : "cancelled", s == ReqState::kTimedOut ? ETIMEDOUT : ECANCELED, msg,
             r.target());
  }
  auto [i, st] = r.first_failure();
  int code = EIO;
  std::string msg = describe_req(r) + ": " + std::to_string(r.failed()) + " of " + std::to_string(r.size()) +
                    " entries failed; first: " + (i >= 0 ? entry_failure(r, i, st, &code) : "?");
  std::string detail = r.detail();
  if (!detail.empty()) msg += " (" + detail + ")";
  raise_py("transfer", code, msg, r.target());
}

}  // namespace

void bind_request(py::module_& m) {
  py::enum_<ReqState>(m, "RequestState", "Terminal states are DONE, FAILED, TIMED_OUT and CANCELLED")
      .value("PENDING", ReqState::kPending)
      .value("DONE", ReqState::kDone)
      .value("FAILED", ReqState::kFailed)
      .value("TIMED_OUT", ReqState::kTimedOut)
      .value("CANCELLED", ReqState::kCancelled);

  py::class_<Request, std::shared_ptr<Request>>(m, "Request", R"doc(
A submitted batch. Ends in exactly one terminal state: DONE (every entry moved all its bytes),
FAILED (some entry failed or hit end of file; see ``status``), TIMED_OUT (the deadline passed
first) or CANCELLED. After TIMED_OUT or CANCELLED some entries may still be running in the
kernel: ``quiesced`` / ``wait_quiesced()`` tell when none is, i.e. when the buffers are safe.

Per entry: ``status`` (int32: 0 done, ENTRY_SHORT end of file, -errno failed, -ECANCELED /
-ETIMEDOUT never started, ENTRY_PENDING / ENTRY_RUNNING not finished) and ``bytes`` (int64).
)doc")
      .def_property_readonly("id", &Request::id)
      .def_property_readonly("op", [](const Request& r) { return op_name(r.op()); })
      .def_property_readonly("file", &Request::file)
      .def_property_readonly("region", &Request::region)
      .def("__len__", &Request::size)
      .def_property_readonly("num_entries", &Request::size)
      .def_property_readonly("state", &Request::poll, "current state (applies the deadline)")
      .def("poll", &Request::poll, "Current state, without blocking (applies the deadline)")
      .def_property_readonly("done", [](Request& r) { return r.poll() != ReqState::kPending; },
                             "True once the request is in a terminal state")
      .def("wait",
           [](Request& r, py::object timeout_s) {
             int64_t t = seconds_to_ns(timeout_s, INT64_MAX, "timeout_s");
             {
               py::gil_scoped_release nogil;  // blocks until terminal or timeout
               r.wait(t);
             }
             return r.poll();
           },
           py::arg("timeout_s") = py::none(),
           "Block until terminal or timeout_s passes (None: until terminal; the request's own deadline "
           "always ends it). Returns the state; PENDING means this wait timed out, not the request.")
      .def("wait_quiesced",
           [](Request& r, py::object timeout_s) {
             int64_t t = seconds_to_ns(timeout_s, INT64_MAX, "timeout_s");
             py::gil_scoped_release nogil;  // blocks until the kernel lets go of the buffers
             return r.wait_quiesced(t);
           },
           py::arg("timeout_s") = py::none(),
           "Block until terminal and no entry is running (True), or timeout (False). After it returns "
           "True no I/O of this request touches its buffers any more and every status is final.")
      .def("cancel", &Request::cancel,
           "Move a pending request to CANCELLED: entries not started are never started (status -ECANCELED), "
           "running ones are cancelled in the kernel where the backend can. Returns True when this call "
           "cancelled it, False when it was already terminal. wait_quiesced() tells when the buffers are safe.")
      .def_property_readonly("quiesced", &Request::quiesced, "terminal, no entry running, every status final")
      .def_property_readonly("in_flight", &Request::running, "entries handed to the kernel or a thread and not finished")
      .def_property_readonly("num_failed", &Request::failed, "entries finished with a non-zero status")
      .def_property_readonly("bytes_done", &Request::bytes_done, "bytes moved so far, all entries")
      .def_property_readonly("duplicate_finishes", &Request::duplicate_finishes,
                             "completions refused because the entry had already finished (always 0)")
      .def_property_readonly("status", [](const Request& r) {
        py::array_t<int32_t> a(static_cast<py::ssize_t>(r.size()));
        r.copy_status(a.mutable_data());
        return a;
      }, "per-entry status, int32 (N,), a copy")
      .def_property_readonly("bytes", [](const Request& r) {
        py::array_t<int64_t> a(static_cast<py::ssize_t>(r.size()));
        r.copy_bytes(a.mutable_data());
        return a;
      }, "per-entry bytes moved, int64 (N,), a copy")
      .def_property_readonly("latency_ns", [](const Request& r) {
        py::array_t<int64_t> a(static_cast<py::ssize_t>(r.size()));
        r.copy_latency(a.mutable_data());
        return a;
      }, "per-entry time from first submission to completion in ns, -1 where not measured (submit with timing=True)")
      .def_property_readonly("deadline_ns", &Request::deadline_ns, "CLOCK_MONOTONIC deadline (2**63-1: none)")
      .def("check", &check, "Raise the outcome's exception unless the state is DONE")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](Request& r, py::args) {
             r.cancel();  // no-op when already terminal
             py::gil_scoped_release nogil;  // blocks until the kernel lets go of the buffers
             r.wait_quiesced(INT64_MAX);
           },
           "Leaving a ``with`` block cancels the request if it has not ended and waits until no "
           "entry is running, so the buffers are safe to reuse after the block.")
      .def("result",
           [](Request& r, py::object timeout_s) {
             int64_t t = seconds_to_ns(timeout_s, INT64_MAX, "timeout_s");
             {
               py::gil_scoped_release nogil;  // blocks until terminal or timeout
               r.wait(t);
             }
             if (r.poll() == ReqState::kPending)
               throw py::value_error("request " + std::to_string(r.id()) + " still pending after timeout_s");
             check(r);
             return r.bytes_done();
           },
           py::arg("timeout_s") = py::none(), "wait(), then check(); returns the bytes moved")
      .def("__repr__", [](Request& r) {
        return "<dpmove.Request " + std::to_string(r.id()) + " " + op_name(r.op()) + " " + std::to_string(r.size()) +
               " entries " + state_name(r.poll()) + ">";
      });
}

}  // namespace dpmove
