#include "common.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "dpmove native core: registered memory, io_uring / thread-pool file I/O, requests";
  m.attr("__version__") = DPMOVE_VERSION;
  dpmove::bind_errors(m);
  dpmove::bind_region(m);
  dpmove::bind_file(m);
  dpmove::bind_request(m);
  dpmove::bind_engine(m);
  dpmove::bind_net(m);
  dpmove::bind_qos(m);
  dpmove::bind_gpu(m);
  dpmove::bind_gpu_kernel(m);
#if DPMOVE_HAVE_XXHASH
  dpmove::bind_checksum(m);
#endif
#if DPMOVE_HAVE_VERBS
  dpmove::bind_verbs(m);
#endif
}
