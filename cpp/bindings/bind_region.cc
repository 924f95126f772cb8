#include "common.h"
#include "dpmove/region.h"
#include "dpmove/gpu.h"
#include "dpmove/status.h"

namespace dpmove {

namespace {
void refuse_device(const Region& r) {
  if (r.memory()->is_device())
    throw py::type_error(std::string("the region is device memory (") +
                         (r.memory()->gpu_api()->emulated() ? "emulated" : "cuda") + ":" +
                         std::to_string(r.memory()->device()) +
                         "); the host cannot address it: copy it to a host region with Engine.copy");
}
}  // namespace

void bind_region(py::module_& m) {
  py::class_<Region, std::shared_ptr<Region>>(m, "Region", py::buffer_protocol(), R"doc(
Host memory that requests read into and write from.

Made by Engine.alloc (page-aligned, zeroed, owned by dpmove) or Engine.register (any
C-contiguous buffer-protocol object; the object stays exported until nothing uses the region).
Supports the buffer protocol (``np.asarray(region)``, ``memoryview(region)``) and slicing
(``region[a:b]``), which returns a Region sharing the memory and keeping it alive.
)doc")
      .def_buffer([](Region& r) -> py::buffer_info {
        r.check_open();
        refuse_device(r);
        return py::buffer_info(r.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(r.size())}, {1}, !r.writable());
      })
      .def("__array__", [](py::object self, py::object dtype, py::object copy) {
        auto& r = self.cast<Region&>();
        r.check_open();
        refuse_device(r);  // numpy would otherwise fall back to __getitem__ and fail obscurely
        py::object a = py::module_::import("numpy").attr("frombuffer")(py::memoryview(self), py::arg("dtype") = "u1");
        return dtype.is_none() ? a : a.attr("astype")(dtype);
      }, py::arg("dtype") = py::none(), py::arg("copy") = py::none())
      .def("__len__", &Region::size)
      .def_property_readonly("nbytes", &Region::size, "size in bytes")
      .def_property_readonly("address", [](const Region& r) { return reinterpret_cast<uintptr_t>(r.data()); },
                             "virtual address of the first byte")
      .def_property_readonly("writable", &Region::writable)
      .def_property_readonly("kind", [](const Region& r) { return r.memory()->kind(); },
                             "'anonymous', 'hugetlb' (dpmove-allocated) or 'buffer' (registered Python object)")
      .def_property_readonly("registered", [](const Region& r) { return r.memory()->registered(); },
                             "True when registered with the rings as fixed buffers")
      .def_property_readonly("registration_error", [](const Region& r) { return r.memory()->registration_error(); },
                             "why registration failed ('' when registered or not attempted)")
      .def_property_readonly("location", [](const Region& r) {
        return r.memory()->is_device() ? r.memory()->kind() == "emulated" || r.memory()->gpu_api()->emulated()
                                             ? "emulated" : "cuda"
                                       : "host";
      }, "'host', 'cuda' (device memory) or 'emulated' (device memory standing in host memory, no GPU here)")
      .def_property_readonly("device", [](const Region& r) { return r.memory()->device(); },
                             "device ordinal of device memory; -1 for host memory")
      .def_property_readonly("pinned", [](const Region& r) { return r.memory()->pinned(); },
                             "host memory page-locked and mapped for GPU copies")
      .def_property_readonly("pin_error", [](const Region& r) { return r.memory()->pin_error(); },
                             "why pinning failed ('' when pinned or not attempted)")
      .def_property_readonly("closed", &Region::closed)
      .def("slice", &Region::slice, py::arg("offset"), py::arg("length"),
           "A view of [offset, offset + length) sharing this region's memory")
      .def("__getitem__", [](const Region& r, py::slice s) {
        size_t start, stop, step, len;
        if (!s.compute(r.size(), &start, &stop, &step, &len)) throw py::error_already_set();
        if (step != 1) throw py::value_error("Region slices must have step 1");
        return r.slice(start, len);
      })
      .def("numpy", [](py::object self, py::object dtype) {
        auto& r = self.cast<Region&>();
        r.check_open();
        refuse_device(r);
        py::dtype dt = py::dtype::from_args(dtype);
        if (r.size() % dt.itemsize())
          throw py::value_error("region of " + std::to_string(r.size()) + " bytes is not a whole number of " +
                                std::to_string(dt.itemsize()) + "-byte items");
        py::array a(dt, {static_cast<py::ssize_t>(r.size() / dt.itemsize())}, {}, r.data(), self);
        if (!r.writable()) a.attr("flags").attr("writeable") = false;
        return a;
      }, py::arg("dtype") = py::dtype::of<uint8_t>(), "A NumPy view of the region (1-D, dtype given); keeps it alive")
      .def("close", &Region::close, "Stop new use; memory is freed when no request or slice holds it")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](Region& r, py::args) { r.close(); })
      .def("__repr__", [](const Region& r) {
        return "<dpmove.Region " + std::to_string(r.size()) + " bytes " + r.memory()->kind() +
               (r.memory()->is_device() ? " device " + std::to_string(r.memory()->device()) : "") +
               (r.memory()->pinned() ? " pinned" : "") +
               (r.memory()->registered() ? " registered" : "") + (r.writable() ? "" : " read-only") +
               (r.closed() ? " closed" : "") + ">";
      });
}

}  // namespace dpmove
