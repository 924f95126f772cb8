#include "common.h"
#include "dpmove/file.h"

namespace dpmove {

void bind_file(py::module_& m) {
  py::class_<File, std::shared_ptr<File>>(m, "File", R"doc(
A file opened for block I/O by Engine.open.

Alignment contract: when ``direct`` is True (O_DIRECT), every entry's file offset and length
must be multiples of ``offset_align`` and its memory address a multiple of ``mem_align``;
misaligned entries raise ValueError before anything is submitted. When ``direct`` is False
any offset and length work.
)doc")
      .def_property_readonly("path", &File::path)
      .def_property_readonly("readable", &File::readable)
      .def_property_readonly("writable", &File::writable)
      .def_property_readonly("direct", &File::direct, "True when opened with O_DIRECT")
      .def_property_readonly("direct_reason", &File::direct_reason, "why direct is what it is")
      .def_property_readonly("mem_align", &File::mem_align, "required memory alignment in bytes (1 when buffered)")
      .def_property_readonly("offset_align", &File::offset_align, "required offset/length alignment in bytes (1 when buffered)")
      .def_property_readonly("alignment", [](const File& f) { return std::max(f.mem_align(), f.offset_align()); },
                             "max(mem_align, offset_align): one number that satisfies both")
      .def_property_readonly("registered", [](const File& f) { return f.fixed_slot() >= 0; },
                             "True when registered with the rings as a fixed file")
      .def_property_readonly("closed", &File::closed)
      .def("fileno", [](const File& f) { f.check_open(); return f.fd(); })
      .def("size", &File::size, "current size in bytes (fstat)")
      .def("truncate", &File::truncate, py::arg("size"))
      .def("allocate", &File::allocate, py::arg("offset"), py::arg("length"), "fallocate: reserve blocks",
           py::call_guard<py::gil_scoped_release>())
      .def("sync", &File::sync, py::arg("data_only") = true, "fdatasync (or fsync when data_only=False)",
           py::call_guard<py::gil_scoped_release>())  // can block on the device
      .def("close", &File::close, "Stop new use; the descriptor closes when no request holds it")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](File& f, py::args) { f.close(); })
      .def("__repr__", [](const File& f) {
        return "<dpmove.File '" + f.path() + "' " + (f.readable() ? "r" : "") + (f.writable() ? "w" : "") +
               (f.direct() ? " O_DIRECT align=" + std::to_string(std::max(f.mem_align(), f.offset_align())) : " buffered") +
               (f.closed() ? " closed" : "") + ">";
      });
}

}  // namespace dpmove
