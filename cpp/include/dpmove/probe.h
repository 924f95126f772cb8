// Host capability probes for `dpmove info`. No side effects beyond a temporary file that is
// removed before returning.
#pragma once

#include <map>
#include <string>

namespace dpmove {

// io_uring on this host: {"usable": "yes"/"no", "reason": ..., plus facts}. When the backend
// was not compiled, says so.
std::map<std::string, std::string> probe_io_uring();

// O_DIRECT on `path` (a file, or a directory in which an unnamed O_TMPFILE is tried):
// {"direct": "yes"/"no", "reason", "mem_align", "offset_align", "alignment_source", "fs"}.
std::map<std::string, std::string> probe_direct(const std::string& path);

}  // namespace dpmove
