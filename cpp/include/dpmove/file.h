// A storage object opened for block I/O.
//
// Alignment contract (O_DIRECT): when direct() is true, every entry's file offset and length
// must be multiples of offset_align() and its memory address a multiple of mem_align().
// Both come from statx(STATX_DIOALIGN) where the kernel reports them (Linux >= 6.1), else
// 4096 is assumed (safe for every common device; the reason says so). Violations are
// rejected before submission with a UsageError naming the required alignment; nothing is
// silently done buffered. Buffered files (direct() false) accept any offset and length.
//
// The descriptor is closed when the last holder (a Python File or an in-flight request) is
// gone, never while a queued request could still use its number; close() only stops new use.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace dpmove {

class FileRegistry {
 public:
  virtual ~FileRegistry() = default;
  // Registers `fd` on every ring. Returns slot >= 0 or -errno. Thread-safe.
  virtual int register_file(int fd) = 0;
  virtual void unregister_file(int slot) = 0;
};

enum class DirectMode { kOff, kOn, kAuto };

struct OpenOptions {
  bool read = true;
  bool write = false;
  bool create = false;
  bool truncate = false;
  DirectMode direct = DirectMode::kAuto;
  unsigned perm = 0644;
};

struct DioAlign {
  uint32_t mem_align = 0;     // bytes; 0 when unknown
  uint32_t offset_align = 0;  // bytes; 0 when unknown
  bool reported = false;      // true when statx(STATX_DIOALIGN) gave the values
};

// statx(STATX_DIOALIGN) of an open descriptor.
DioAlign query_dio_align(int fd);

class File {
 public:
  // Throws SysError (errno and path kept) when open fails, UsageError for bad options.
  static std::shared_ptr<File> open(const std::string& path, const OpenOptions& opts);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  int fd() const noexcept { return fd_; }
  const std::string& path() const noexcept { return path_; }
  bool readable() const noexcept { return readable_; }
  bool writable() const noexcept { return writable_; }
  bool direct() const noexcept { return direct_; }
  // Why direct() is what it is (e.g. "filesystem refused O_DIRECT (EINVAL)").
  const std::string& direct_reason() const noexcept { return direct_reason_; }
  uint32_t mem_align() const noexcept { return mem_align_; }
  uint32_t offset_align() const noexcept { return offset_align_; }

  int64_t size() const;                          // fstat; throws SysError
  void truncate(int64_t size);                   // ftruncate; throws SysError
  void allocate(int64_t offset, int64_t length);  // fallocate(0): reserves blocks; throws SysError
  void sync(bool data_only);                     // fdatasync / fsync; throws SysError

  void register_with(const std::shared_ptr<FileRegistry>& registry);
  int fixed_slot() const noexcept { return fixed_slot_.load(std::memory_order_acquire); }
  // True when the fixed slot belongs to a registry other than `registry` (another engine's,
  // or one that is gone): on `registry`'s rings that slot number names some other file.
  bool registered_elsewhere(const FileRegistry* registry) const noexcept;

  void close();
  bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }
  void check_open() const;

 private:
  File() = default;
  int fd_ = -1;
  std::string path_;
  bool readable_ = false;
  bool writable_ = false;
  bool direct_ = false;
  std::string direct_reason_;
  uint32_t mem_align_ = 1;
  uint32_t offset_align_ = 1;
  std::atomic<int> fixed_slot_{-1};
  std::weak_ptr<FileRegistry> registry_;
  std::mutex mu_;
  std::atomic<bool> closed_{false};
};

}  // namespace dpmove
