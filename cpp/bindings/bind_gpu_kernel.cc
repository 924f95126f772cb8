// Private hooks on the embedded batched copy kernel (fatbin, NVRTC source) for the tests.
#include "common.h"
#include "dpmove/gpu_kernel.h"

namespace dpmove {

void bind_gpu_kernel(py::module_& m) {
  m.def("_nvrtc_compile_batched", [](const std::string& arch) {
    std::string ptx;
    {
      py::gil_scoped_release nogil;
      ptx = gpu::nvrtc_compile_batched(arch);
    }
    return ptx;
  }, py::arg("arch"), "PTX of the batched copy kernel compiled by NVRTC for `arch` (e.g. 'compute_90')");
  m.def("_batched_fatbin_size", [] {
    size_t size = 0;
    gpu::batched_fatbin(&size);
    return size;
  }, "bytes of the nvcc-built fatbin embedded in the module (0: none, see _batched_fatbin_missing)");
  m.def("_batched_fatbin_missing", [] { return std::string(gpu::batched_fatbin_missing()); },
        "why no fatbin was built ('' when it was)");
  m.def("_batched_source", [] { return std::string(gpu::batched_source()); },
        "the self-contained kernel source NVRTC compiles");
  m.def("_nvrtc_status", &gpu::nvrtc_status, "where libnvrtc was loaded from, or why it cannot be");
}

}  // namespace dpmove
