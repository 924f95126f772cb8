#include "common.h"
#include "dpmove/status.h"

namespace dpmove {

void raise_py(const char* kind, int code, const std::string& msg, const std::string& filename) {
  py::object make = py::module_::import("dpmove.errors").attr("from_core");
  py::object exc = make(kind, code, msg, filename.empty() ? py::none() : py::cast(filename));
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

void bind_errors(py::module_& m) {
  // C++ exceptions -> Python at the binding edge. errno and context survive the crossing.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const UnsupportedError& e) {
      try {
        raise_py("unsupported", e.code(), e.what(), e.filename);
      } catch (py::error_already_set& err) {
        err.restore();
      }
    } catch (const SysError& e) {
      try {
        raise_py("error", e.code(), e.what(), e.filename);
      } catch (py::error_already_set& err) {
        err.restore();
      }
    } catch (const UsageError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.attr("ENTRY_OK") = kEntryOk;
  m.attr("ENTRY_PENDING") = kEntryPending;
  m.attr("ENTRY_RUNNING") = kEntryRunning;
  m.attr("ENTRY_SHORT") = kEntryShort;
}

}  // namespace dpmove
