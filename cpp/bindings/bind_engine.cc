#include <Python.h>

#include <climits>
#include <mutex>
#include <vector>

#include "common.h"
#include "dpmove/engine.h"
#include "dpmove/probe.h"
#include "dpmove/status.h"

namespace dpmove {

namespace {

// Work that needs the GIL, queued by threads that must not wait for it (see gil_releaser).
std::mutex g_release_mu;
std::vector<std::function<void()>> g_release_queue;
bool g_release_scheduled = false;

// Runs in the main thread with the GIL (a pending call), or wherever the GIL is already held.
int drain_releases(void*) {
  std::vector<std::function<void()>> work;
  {
    std::lock_guard<std::mutex> lk(g_release_mu);
    work.swap(g_release_queue);
    g_release_scheduled = false;
  }
  for (auto& w : work) w();
  return 0;
}

}  // namespace

std::function<void()> gil_releaser(std::function<void()> fn) {
  return [fn = std::move(fn)]() mutable {
#if PY_VERSION_HEX >= 0x030D0000
    if (!Py_IsInitialized() || Py_IsFinalizing()) return;
#else
    if (!Py_IsInitialized() || _Py_IsFinalizing()) return;
#endif
    if (PyGILState_Check()) {
      fn();
      return;
    }
    bool schedule;
    {
      std::lock_guard<std::mutex> lk(g_release_mu);
      g_release_queue.push_back(std::move(fn));
      schedule = !g_release_scheduled;
      g_release_scheduled = true;
    }
    // A full pending-call queue leaves the work queued; the next release schedules again.
    if (schedule && Py_AddPendingCall(drain_releases, nullptr) != 0) {
      std::lock_guard<std::mutex> lk(g_release_mu);
      g_release_scheduled = false;
    }
  };
}

void drain_gil_releases() { drain_releases(nullptr); }

namespace {

// Release callback for memory exported by a Python object (see gil_releaser).
std::function<void()> buffer_releaser(Py_buffer* view) {
  return gil_releaser([view] {
    PyBuffer_Release(view);
    delete view;
  });
}

std::shared_ptr<Region> register_object(Engine& e, py::handle obj, bool do_register) {
  if (py::isinstance<Region>(obj)) return obj.cast<std::shared_ptr<Region>>();
  drain_releases(nullptr);  // views queued by other threads, while we hold the GIL
  auto* view = new Py_buffer;
  if (PyObject_GetBuffer(obj.ptr(), view, PyBUF_RECORDS_RO) != 0) {
    delete view;
    PyErr_Clear();
    throw py::type_error(std::string("expected a Region or a writable buffer-protocol object (numpy array, bytearray), got ") +
                         Py_TYPE(obj.ptr())->tp_name);
  }
  if (!PyBuffer_IsContiguous(view, 'C')) {
    PyBuffer_Release(view);
    delete view;
    throw py::value_error("expected a C-contiguous buffer; this one is strided (use np.ascontiguousarray, or register the base array and address a slice)");
  }
  bool writable = !view->readonly;
  auto* base = static_cast<uint8_t*>(view->buf);
  size_t len = static_cast<size_t>(view->len);
  // wrap() takes ownership of `view` through the release callback, also when it throws.
  return e.wrap(base, len, writable, buffer_releaser(view), do_register, "buffer");
}

py::dict to_dict(const std::map<std::string, std::string>& m) {
  py::dict d;
  for (auto& kv : m) d[py::str(kv.first)] = kv.second;
  return d;
}

py::dict stats_dict(const BackendStats& s) {
  py::dict d;
  d["entries_started"] = s.entries_started;
  d["ops_submitted"] = s.ops_submitted;
  d["resubmits"] = s.resubmits;
  d["cancels_sent"] = s.cancels_sent;
  d["fixed_buffer_ops"] = s.fixed_buffer_ops;
  d["fixed_file_ops"] = s.fixed_file_ops;
  d["stale_completions"] = s.stale_completions;
  return d;
}

OpenOptions parse_mode(const std::string& mode, const py::object& direct) {
  OpenOptions o;
  if (mode == "r") {
    o.read = true;
  } else if (mode == "r+") {
    o.read = o.write = true;
  } else if (mode == "w") {
    o.read = false;
    o.write = o.create = o.truncate = true;
  } else if (mode == "w+") {
    o.read = o.write = o.create = o.truncate = true;
  } else if (mode == "rw") {
    o.read = o.write = o.create = true;
  } else {
    throw py::value_error("mode must be 'r', 'r+', 'rw', 'w' or 'w+', got '" + mode + "'");
  }
  if (direct.is_none() || (py::isinstance<py::str>(direct) && direct.cast<std::string>() == "auto")) {
    o.direct = DirectMode::kAuto;
  } else if (py::isinstance<py::bool_>(direct)) {
    o.direct = direct.cast<bool>() ? DirectMode::kOn : DirectMode::kOff;
  } else {
    throw py::value_error("direct must be True, False or 'auto'");
  }
  return o;
}

std::shared_ptr<Request> submit(Engine& e, OpKind op, const std::shared_ptr<File>& f, py::handle region,
                                py::array entries, py::object timeout_s, bool timing, int qos_class) {
  if (!f) throw py::type_error("expected a File, got None");
  // Entry arrays arrive normalised by dpmove.Engine (int64, C-contiguous, (N, 3)).
  if (!py::isinstance<py::array_t<int64_t>>(entries) || entries.ndim() != 2 || entries.shape(1) != 3 ||
      !(entries.flags() & py::array::c_style))
    throw py::type_error("entries must be a C-contiguous int64 array of shape (N, 3): file_offset, region_offset, length");
  auto r = register_object(e, region, false);
  int64_t t = seconds_to_ns(timeout_s, -1, "timeout_s");
  const auto* rows = static_cast<const IoEntry*>(entries.data());
  size_t n = static_cast<size_t>(entries.shape(0));
  // Validation and the copy are O(N): release the GIL for large batches only, where the
  // ~1 us of a release/reacquire round trip is small next to the work.
  if (n < 1024) return e.submit(op, f, r, rows, n, t, timing, qos_class);
  py::gil_scoped_release nogil;
  return e.submit(op, f, r, rows, n, t, timing, qos_class);
}

// {"classes": [ {name, level, weight, rate_bps, burst_bytes, ib_sl, roce_tclass}, ...],
//  "starvation_bound_ns", "quantum_bytes", "enabled", "default_class",
//  "storage": {inflight_bytes, low_inflight_bytes, low_chunk_bytes}, "net": {...}}
// as built by dpmove.qos.QosConfig.core_options().
void apply_qos(EngineOptions& o, const py::dict& q) {
  qos::GateOptions base;
  for (auto c : q["classes"].cast<py::list>()) base.classes.push_back(qos_class_from(c));
  base.starvation_bound_ns = q["starvation_bound_ns"].cast<int64_t>();
  base.quantum_bytes = q["quantum_bytes"].cast<uint64_t>();
  base.enabled = q["enabled"].cast<bool>();
  o.default_class = q["default_class"].cast<int>();
  auto path = [&](const char* name) {
    qos::GateOptions g = base;
    auto p = q[name].cast<py::dict>();
    if (p.contains("classes")) {  // the path's own rate limits (PathLimits.rates)
      g.classes.clear();
      for (auto c : p["classes"].cast<py::list>()) g.classes.push_back(qos_class_from(c));
    }
    g.inflight_bytes = p["inflight_bytes"].cast<uint64_t>();
    g.low_inflight_bytes = p["low_inflight_bytes"].cast<uint64_t>();
    g.low_chunk_bytes = p["low_chunk_bytes"].cast<uint64_t>();
    g.reserve_idle_ns = p["reserve_idle_ns"].cast<int64_t>();
    return g;
  };
  o.storage_qos = path("storage");
  o.net_qos = path("net");
  o.copy_qos = path("copy");
}

py::dict gate_stats(const qos::Gate& g) {
  py::dict out;
  for (size_t c = 0; c < g.num_classes(); ++c) {
    qos::GateClassStats s = g.stats(static_cast<int>(c));
    // The arbiter's counters, with bytes / ops as dispatched (counted with QoS off too).
    py::dict d = qos_stats_dict(s.arb);
    d["queued_ops"] = d.attr("pop")("queued");
    d["bytes"] = s.bytes;
    d["ops"] = s.ops;
    d["queued_bytes"] = s.queued_bytes;
    d["inflight_bytes"] = s.inflight_bytes;
    out[py::str(g.options().classes[c].name)] = d;
  }
  return out;
}

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
      .def(py::init([](const std::string& backend, int num_workers, unsigned queue_depth, bool register_buffers,
                       bool register_files, py::object default_timeout_s, const std::string& listen_host, int listen_port,
                       bool listen_unix, const std::string& name, py::object qos, const std::string& gpu,
                       bool pin_host) {
             if (listen_port < 0 || listen_port > 65535)
               throw py::value_error("listen_port must be in [0, 65535], got " + std::to_string(listen_port));
             EngineOptions o;
             o.backend = backend;
             o.num_workers = num_workers;
             o.queue_depth = queue_depth;
             o.register_buffers = register_buffers;
             o.register_files = register_files;
             o.default_timeout_ns = seconds_to_ns(default_timeout_s, INT64_MAX, "default_timeout_s");
             o.net.listen_host = listen_host;
             o.net.listen_port = static_cast<uint16_t>(listen_port);
             o.net.listen_unix = listen_unix;
             o.net.name = name;
             if (!qos.is_none()) apply_qos(o, qos.cast<py::dict>());
             o.gpu = gpu;
             o.pin_host = pin_host;
             return release_gil_on_drop(Engine::create(o));
           }),
           py::arg("backend") = "auto", py::arg("num_workers") = 2, py::arg("queue_depth") = 64,
           py::arg("register_buffers") = true, py::arg("register_files") = true, py::arg("default_timeout_s") = 60.0,
           py::arg("listen_host") = "127.0.0.1", py::arg("listen_port") = 0, py::arg("listen_unix") = true, py::arg("name") = "",
           py::arg("qos") = py::none(), py::arg("gpu") = "auto", py::arg("pin_host") = true)
      .def_property_readonly("default_timeout_ns", [](const Engine& e) { return e.options().default_timeout_ns; })
      .def_property_readonly("backend", &Engine::backend_name)
      .def_property_readonly("backend_reason", &Engine::backend_reason)
      .def_property_readonly("closed", &Engine::closed)
      .def_property_readonly("num_workers", [](const Engine& e) { return e.options().num_workers; })
      .def_property_readonly("queue_depth", [](const Engine& e) { return e.options().queue_depth; })
      .def("alloc", &Engine::allocate, py::arg("nbytes"), py::arg("hugepages") = false, py::arg("register") = true)
      .def("register", [](Engine& e, py::handle obj, bool do_register) {
        e.check_open();
        return register_object(e, obj, do_register);
      }, py::arg("obj"), py::arg("register") = true)
      .def("open", [](Engine& e, const std::string& path, const std::string& mode, py::object direct, bool do_register) {
        OpenOptions o = parse_mode(mode, direct);
        py::gil_scoped_release nogil;  // open() can block on a network filesystem
        return e.open(path, o, do_register);
      }, py::arg("path"), py::arg("mode") = "r", py::arg("direct") = "auto", py::arg("register") = true)
      .def("read", [](Engine& e, const std::shared_ptr<File>& f, py::handle region, py::array entries, py::object timeout_s,
                      bool timing, int qos_class) { return submit(e, OpKind::kRead, f, region, entries, timeout_s, timing, qos_class); },
           py::arg("file"), py::arg("region"), py::arg("entries"), py::arg("timeout_s") = py::none(), py::arg("timing") = false,
           py::arg("qos_class") = -1)
      .def("write", [](Engine& e, const std::shared_ptr<File>& f, py::handle region, py::array entries, py::object timeout_s,
                       bool timing, int qos_class) { return submit(e, OpKind::kWrite, f, region, entries, timeout_s, timing, qos_class); },
           py::arg("file"), py::arg("region"), py::arg("entries"), py::arg("timeout_s") = py::none(), py::arg("timing") = false,
           py::arg("qos_class") = -1)
      .def("qos_stats", [](const Engine& e) {
        py::dict d;
        d["storage"] = gate_stats(*e.storage_gate());
        d["net"] = gate_stats(*e.net_gate());
        d["copy"] = gate_stats(*e.copy_gate());
        return d;
      }, "per path, per traffic class: bytes, ops, queued_ops/bytes, inflight_bytes, wait p50/p99/max (ns), throttled_ns")
      .def_property_readonly("qos_enabled", [](const Engine& e) { return e.storage_gate()->options().enabled; })
      .def("close", [](Engine& e, py::object timeout_s) {
        int64_t t = seconds_to_ns(timeout_s, INT64_MAX, "timeout_s");
        py::gil_scoped_release nogil;  // joins workers; waits for the kernel to release buffers
        return e.close(t);
      }, py::arg("timeout_s") = 10.0)
      .def("stats", [](const Engine& e) {
        py::dict d = stats_dict(e.stats());
        d["requests_submitted"] = e.requests_submitted();
        return d;
      })
      .def("describe", [](const Engine& e) { return to_dict(e.describe()); });

  m.def("uring_compiled", &uring_compiled);
  m.def("probe_io_uring", [] { return to_dict(probe_io_uring()); });
  m.def("probe_direct", [](const std::string& p) {
    py::gil_scoped_release nogil;  // touches the filesystem
    return probe_direct(p);
  }, py::arg("path"));
}

}  // namespace dpmove
