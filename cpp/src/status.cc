#include "dpmove/status.h"

#include <cstring>

namespace dpmove {

SysError::SysError(int code, std::string context)
    : std::runtime_error(context + ": " + errno_str(code)), code_(code), context_(std::move(context)) {}

std::string errno_str(int code) {
  char buf[128];
  // GNU strerror_r returns a pointer that may or may not be buf.
  const char* msg = strerror_r(code, buf, sizeof(buf));
  const char* name = strerrorname_np(code);
  std::string out = msg ? msg : "unknown error";
  if (name) {
    out += " (";
    out += name;
    out += ")";
  }
  return out;
}

void throw_sys(int code, const std::string& context, const std::string& filename) {
  SysError e(code, context);
  e.filename = filename;
  throw e;
}

}  // namespace dpmove
