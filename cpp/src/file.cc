#include "dpmove/file.h"

#include <fcntl.h>
#include <linux/stat.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "dpmove/status.h"

namespace dpmove {

DioAlign query_dio_align(int fd) {
  DioAlign out;
  struct statx stx {};
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN)) {
    out.mem_align = stx.stx_dio_mem_align;
    out.offset_align = stx.stx_dio_offset_align;
    out.reported = true;
  }
  return out;
}

std::shared_ptr<File> File::open(const std::string& path, const OpenOptions& o) {
  if (!o.read && !o.write) throw UsageError("open: mode must allow reading, writing or both");
  if ((o.create || o.truncate) && !o.write)
    throw UsageError("open: create/truncate need a writable mode ('w' or 'rw')");
  int flags = O_CLOEXEC;
  flags |= (o.read && o.write) ? O_RDWR : (o.write ? O_WRONLY : O_RDONLY);
  if (o.create) flags |= O_CREAT;
  if (o.truncate) flags |= O_TRUNC;

  std::shared_ptr<File> f(new File());
  f->path_ = path;
  f->readable_ = o.read;
  f->writable_ = o.write;
  int fd = -1;
  if (o.direct != DirectMode::kOff) {
    fd = ::open(path.c_str(), flags | O_DIRECT, o.perm);
    if (fd >= 0) {
      f->direct_ = true;
      f->direct_reason_ = "O_DIRECT";
    } else if (errno == EINVAL && o.direct == DirectMode::kAuto) {
      f->direct_reason_ = "filesystem refused O_DIRECT (EINVAL); buffered I/O through the page cache";
    } else if (errno == EINVAL) {
      throw_sys(EINVAL, "open(O_DIRECT) '" + path + "': the filesystem does not support direct I/O (pass direct='auto' or False)", path);
    } else {
      throw_sys(errno, "open '" + path + "'", path);
    }
  } else {
    f->direct_reason_ = "direct=False requested";
  }
  if (fd < 0) {
    fd = ::open(path.c_str(), flags, o.perm);
    if (fd < 0) throw_sys(errno, "open '" + path + "'", path);
  }
  f->fd_ = fd;
  struct stat st {};
  if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    throw_sys(EISDIR, "open '" + path + "': is a directory", path);  // ~File closes fd
  }
  if (f->direct_) {
    DioAlign a = query_dio_align(fd);
    if (a.reported && a.mem_align == 0) {
      // statx says this file cannot do direct I/O even though open accepted the flag.
      if (o.direct == DirectMode::kOn)
        throw_sys(EINVAL, "open(O_DIRECT) '" + path + "': statx reports no direct I/O support", path);
      int cur = fcntl(fd, F_GETFL);
      if (cur < 0 || fcntl(fd, F_SETFL, cur & ~O_DIRECT) != 0)
        throw_sys(errno, "open '" + path + "': clearing O_DIRECT after statx refused direct I/O", path);
      f->direct_ = false;
      f->direct_reason_ = "statx reports no direct I/O support; buffered I/O";
    } else if (a.reported) {
      f->mem_align_ = a.mem_align;
      // Never 0 (a divisor in the alignment checks); a filesystem that reports a memory
      // alignment but no offset alignment gets the memory one for both.
      f->offset_align_ = a.offset_align ? a.offset_align : a.mem_align;
      f->direct_reason_ = "O_DIRECT; alignment from statx(STATX_DIOALIGN)";
    } else {
      f->mem_align_ = 4096;
      f->offset_align_ = 4096;
      f->direct_reason_ = "O_DIRECT; kernel did not report alignment, assuming 4096";
    }
  }
  return f;
}

File::~File() {
  int slot = fixed_slot_.exchange(-1);
  if (slot >= 0)
    if (auto reg = registry_.lock()) reg->unregister_file(slot);
  if (fd_ >= 0) ::close(fd_);
}

void File::check_open() const {
  if (closed()) throw ClosedError("File '" + path_ + "' is closed");
}

int64_t File::size() const {
  check_open();
  struct stat st {};
  if (fstat(fd_, &st) != 0) throw_sys(errno, "fstat '" + path_ + "'", path_);
  return st.st_size;
}

void File::truncate(int64_t size) {
  check_open();
  if (size < 0) throw UsageError("truncate: size must be >= 0 bytes");
  if (!writable_) throw UnsupportedError(EBADF, "truncate '" + path_ + "': file was opened read-only");
  if (ftruncate(fd_, size) != 0) throw_sys(errno, "ftruncate '" + path_ + "'", path_);
}

void File::allocate(int64_t offset, int64_t length) {
  check_open();
  if (offset < 0 || length <= 0) throw UsageError("allocate: offset must be >= 0 and length > 0 bytes");
  if (!writable_) throw UnsupportedError(EBADF, "allocate '" + path_ + "': file was opened read-only");
  if (fallocate(fd_, 0, offset, length) != 0) throw_sys(errno, "fallocate '" + path_ + "'", path_);
}

void File::sync(bool data_only) {
  check_open();
  int rc = data_only ? fdatasync(fd_) : fsync(fd_);
  if (rc != 0) throw_sys(errno, std::string(data_only ? "fdatasync" : "fsync") + " '" + path_ + "'", path_);
}

void File::register_with(const std::shared_ptr<FileRegistry>& registry) {
  std::lock_guard<std::mutex> lk(mu_);
  if (fixed_slot_.load() >= 0) return;
  int slot = registry->register_file(fd_);
  if (slot >= 0) {
    registry_ = registry;
    fixed_slot_.store(slot, std::memory_order_release);
  }
}

bool File::registered_elsewhere(const FileRegistry* registry) const noexcept {
  // registry_ is written before the release store of fixed_slot_ and never changes after.
  return fixed_slot() >= 0 && registry_.lock().get() != registry;
}

void File::close() {
  closed_.store(true, std::memory_order_release);
  // The fixed slot stays registered until the descriptor is closed: queued requests may still
  // name it. Both go in ~File, once the last holder is gone.
}

}  // namespace dpmove
