// Device regions (dpmove-allocated, DLPack, raw addresses from __cuda_array_interface__) and
// host<->GPU copies: methods added to Engine, plus the emulated GPU's test controls.
#include <cerrno>
#include <cstring>

#include "common.h"
#include "dpmove/engine.h"
#include "dpmove/gpu.h"
#include "dpmove/gpu_emulated.h"
#include "dpmove/status.h"

namespace dpmove {
namespace {

// DLPack ABI (dlpack.h, v0.x "dltensor" and v1.x "dltensor_versioned" capsules).
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code, bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL = C-contiguous
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLManagedTensorVersioned {
  uint32_t major, minor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  DLTensor dl_tensor;
};
constexpr uint64_t kDLFlagReadOnly = 1;
constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;

std::string dl_device_name(int32_t t) {
  switch (t) {
    case kDLCPU: return "kDLCPU (host memory)";
    case kDLCUDA: return "kDLCUDA";
    case kDLCUDAHost: return "kDLCUDAHost (pinned host memory)";
    case kDLCUDAManaged: return "kDLCUDAManaged (managed memory)";
    default: return "device type " + std::to_string(t);
  }
}

// Bytes spanned by a C-contiguous tensor; ValueError for strided or sub-byte layouts.
size_t contiguous_nbytes(const DLTensor& t) {
  if (t.ndim < 0) throw py::value_error("DLPack tensor has ndim < 0");
  const size_t bits = static_cast<size_t>(t.dtype.bits) * (t.dtype.lanes ? t.dtype.lanes : 1);
  if (bits % 8) throw py::value_error("DLPack tensor has a sub-byte element type (" + std::to_string(bits) + " bits)");
  size_t n = 1;
  int64_t expect = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    const int64_t dim = t.shape[d];
    if (dim < 0) throw py::value_error("DLPack tensor has a negative dimension");
    if (t.strides && dim > 1 && t.strides[d] != expect)
      throw py::value_error("expected a C-contiguous tensor; this one is strided (dimension " + std::to_string(d) +
                            " has stride " + std::to_string(t.strides[d]) + " elements, C order needs " +
                            std::to_string(expect) + "); make it contiguous first (e.g. .contiguous() / cupy.ascontiguousarray)");
    expect *= dim;
    n *= static_cast<size_t>(dim);
  }
  return n * bits / 8;
}

std::shared_ptr<Region> register_dlpack(Engine& e, py::capsule cap, int device, py::object readonly) {
  const char* name = PyCapsule_GetName(cap.ptr());
  const bool versioned = name && std::strcmp(name, "dltensor_versioned") == 0;
  if (!name || (!versioned && std::strcmp(name, "dltensor") != 0))
    throw py::value_error(std::string("expected an unused DLPack capsule ('dltensor' or 'dltensor_versioned'), got '") +
                          (name ? name : "(null)") + "'" +
                          (name && std::strncmp(name, "used_", 5) == 0 ? ": it was already consumed" : ""));
  void* p = PyCapsule_GetPointer(cap.ptr(), name);
  if (!p) throw py::error_already_set();
  const DLTensor& t = versioned ? static_cast<DLManagedTensorVersioned*>(p)->dl_tensor : static_cast<DLManagedTensor*>(p)->dl_tensor;
  if (versioned && static_cast<DLManagedTensorVersioned*>(p)->major > 1)
    throw py::value_error("DLPack capsule of version " + std::to_string(static_cast<DLManagedTensorVersioned*>(p)->major) +
                          ".x; dpmove reads 0.x and 1.x");
  if (t.device.device_type != kDLCUDA)
    throw py::value_error("expected device memory (DLPack kDLCUDA), got " + dl_device_name(t.device.device_type) +
                          (t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost
                               ? "; register host memory with Engine.register"
                               : ""));
  if (device >= 0 && device != t.device.device_id)
    throw py::value_error("the tensor is on device " + std::to_string(t.device.device_id) + ", not device " +
                          std::to_string(device));
  const size_t nbytes = contiguous_nbytes(t);
  const uint64_t addr = reinterpret_cast<uint64_t>(t.data) + t.byte_offset;
  bool ro = versioned && (static_cast<DLManagedTensorVersioned*>(p)->flags & kDLFlagReadOnly);
  if (!readonly.is_none()) {
    if (ro && !readonly.cast<bool>()) throw py::value_error("the tensor is read-only (DLPack READ_ONLY flag)");
    ro = readonly.cast<bool>();
  }
  // Consume the capsule: from here the deleter is ours to call, once, when nothing uses the
  // memory any more (with the GIL: producers' deleters drop Python references).
  PyCapsule_SetName(cap.ptr(), versioned ? "used_dltensor_versioned" : "used_dltensor");
  std::function<void()> release = gil_releaser([p, versioned] {
    if (versioned) {
      auto* m = static_cast<DLManagedTensorVersioned*>(p);
      if (m->deleter) m->deleter(m);
    } else {
      auto* m = static_cast<DLManagedTensor*>(p);
      if (m->deleter) m->deleter(m);
    }
  });
  return e.wrap_device(addr, nbytes, t.device.device_id, !ro, std::move(release), "dlpack");
}

py::dict copy_stats_dict(const copy::Stats& s) {
  py::dict d;
  d["runs"] = s.runs;
  d["copies"] = s.copies;
  d["launches"] = s.launches;
  d["bytes"] = s.bytes;
  d["errors"] = s.errors;
  d["pageable"] = s.pageable;
  d["submit_ns"] = s.submit_ns;
  d["desc_tables"] = s.desc_tables;
  return d;
}

}  // namespace

void bind_gpu(py::module_& m) {
  auto cls = py::reinterpret_borrow<py::class_<Engine, std::shared_ptr<Engine>>>(m.attr("Engine"));
  cls.def("device_alloc", [](Engine& e, size_t nbytes, int device) {
        py::gil_scoped_release nogil;  // cuMemAlloc may synchronise the device
        return e.device_alloc(nbytes, device);
      }, py::arg("nbytes"), py::arg("device") = 0)
      .def("_wrap_device", [](Engine& e, uint64_t addr, size_t nbytes, int device, bool writable, py::object owner,
                              const std::string& kind) {
        drain_gil_releases();
        // The owner (the array that holds the memory) stays referenced until nothing uses it.
        PyObject* o = owner.release().ptr();
        return e.wrap_device(addr, nbytes, device, writable, gil_releaser([o] { Py_DECREF(o); }), kind);
      }, py::arg("address"), py::arg("nbytes"), py::arg("device"), py::arg("writable"), py::arg("owner"),
         py::arg("kind"))
      .def("_register_dlpack", [](Engine& e, py::capsule cap, int device, py::object readonly) {
        drain_gil_releases();
        return register_dlpack(e, cap, device, readonly);
      }, py::arg("capsule"), py::arg("device") = -1, py::arg("readonly") = py::none())
      .def("copy", [](Engine& e, const std::string& op, const std::shared_ptr<Region>& device,
                      const std::shared_ptr<Region>& host, py::array entries, py::object timeout_s, bool timing,
                      int qos_class, const std::string& backend) {
        if (op != "h2d" && op != "d2h") throw py::value_error("op must be 'h2d' or 'd2h', got '" + op + "'");
        if (!py::isinstance<py::array_t<int64_t>>(entries) || entries.ndim() != 2 || entries.shape(1) != 3 ||
            !(entries.flags() & py::array::c_style))
          throw py::type_error("entries must be a C-contiguous int64 array of shape (N, 3): device_offset, host_offset, length");
        int64_t t = seconds_to_ns(timeout_s, -1, "timeout_s");
        const auto* rows = static_cast<const IoEntry*>(entries.data());
        size_t n = static_cast<size_t>(entries.shape(0));
        // Submission makes driver calls (and may dispatch at once): without the GIL.
        py::gil_scoped_release nogil;
        return e.copy(op == "h2d" ? OpKind::kH2D : OpKind::kD2H, device, host, rows, n, t, timing, qos_class, backend);
      }, py::arg("op"), py::arg("device"), py::arg("host"), py::arg("entries"), py::arg("timeout_s") = py::none(),
         py::arg("timing") = false, py::arg("qos_class") = -1, py::arg("backend") = "auto")
      .def("copy_backend_status", [](Engine& e, const std::string& backend, int device) {
        py::gil_scoped_release nogil;  // may load the kernel module
        return e.copy_backend_status(backend, device);
      }, py::arg("backend"), py::arg("device") = 0)
      .def("copy_stats", [](const Engine& e) {
        py::dict d;
        for (auto& kv : e.copy_stats()) d[py::str(kv.first)] = copy_stats_dict(kv.second);
        return d;
      })
      .def("gpu_info", [](Engine& e) {
        py::dict d;
        gpu::GpuApi* g = e.gpu();
        d["provider"] = g ? g->provider() : "off";
        d["emulated"] = g ? g->emulated() : false;
        d["reason"] = e.gpu_reason();
        py::list devs;
        for (int i = 0; g && i < g->device_count(); ++i) {
          py::dict dd;
          dd["index"] = i;
          dd["name"] = g->device_name(i);
          dd["compute_capability"] = g->compute_capability(i);
          devs.append(dd);
        }
        d["devices"] = devs;
        return d;
      });

  m.def("cuda_status", [] {
    std::string why;
    bool ok;
    {
      py::gil_scoped_release nogil;
      ok = gpu::cuda_usable(&why);
    }
    py::dict d;
    d["usable"] = ok;
    d["reason"] = why;
    d["devices"] = ok ? gpu::cuda_gpu().device_count() : 0;
    return d;
  }, "Whether the CUDA driver loads and sees a device, and why not");
  m.def("_emulated_gpu_stall", [](bool on) { gpu::emulated::stall(on); }, py::arg("on"));
  m.def("_emulated_gpu_inject", [](uint64_t nth, int code) { gpu::emulated::inject(nth, code); }, py::arg("nth"),
        py::arg("code") = 700);
  m.def("_emulated_gpu_ops", [] { return gpu::emulated::ops_run(); });
}

}  // namespace dpmove
