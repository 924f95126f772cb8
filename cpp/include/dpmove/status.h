// Errors of the core.
//
// Contract: functions that talk to the OS return a negative errno (liburing style) on the hot
// path and never throw there. Functions called from the binding edge throw:
//   SysError   - an OS or driver call failed; keeps errno and what was being done. The binding
//                turns it into dpmove.Error (an OSError subclass) with errno preserved.
//   UsageError - the caller passed something the API does not accept (shape, size, alignment,
//                mode); the message says what was expected. Becomes ValueError.
//   ClosedError - a closed Engine, File or Region was used. Becomes ValueError.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dpmove {

class SysError : public std::runtime_error {
 public:
  SysError(int code, std::string context);
  int code() const noexcept { return code_; }
  const std::string& context() const noexcept { return context_; }
  // Optional path the error concerns (becomes OSError.filename).
  std::string filename;

 private:
  int code_;
  std::string context_;
};

class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class ClosedError : public UsageError {
 public:
  using UsageError::UsageError;
};

// Misuse that is also an OS-level refusal (e.g. writing a file opened read-only): becomes
// dpmove.UnsupportedOperation, a subclass of both dpmove.Error and ValueError, errno kept.
class UnsupportedError : public SysError {
 public:
  using SysError::SysError;
};

// "Operation not permitted (EPERM)": strerror plus the symbolic name.
std::string errno_str(int code);

[[noreturn]] void throw_sys(int code, const std::string& context, const std::string& filename = {});

// Per-entry status codes (int32): 0 done, >0 dpmove-specific, <0 a negated errno.
constexpr int32_t kEntryOk = 0;
constexpr int32_t kEntryPending = 1;  // queued, not started
constexpr int32_t kEntryRunning = 2;  // handed to the kernel or a thread; may touch buffers
constexpr int32_t kEntryShort = 3;    // read reached end of file: bytes < length

}  // namespace dpmove
