#include "dpmove/region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "dpmove/status.h"

namespace dpmove {

Memory::Memory(uint8_t* base, size_t size, bool writable, std::function<void()> release, std::string kind)
    : base_(base), size_(size), writable_(writable), release_(std::move(release)), kind_(std::move(kind)) {}

Memory::~Memory() {
  run_close_hooks();
  unregister();
  if (unpin_) unpin_();
  if (release_) release_();
}

void Memory::on_close(std::function<void()> hook) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!closed()) {
    close_hooks_.push_back(std::move(hook));
    return;
  }
  lk.unlock();
  hook();
}

void Memory::run_close_hooks() {
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard<std::mutex> lk(mu_);
    hooks.swap(close_hooks_);
  }
  for (auto& h : hooks) h();
}

std::shared_ptr<Memory> Memory::allocate(size_t size, bool hugepages) {
  if (size == 0) throw UsageError("alloc: size must be > 0 bytes");
  constexpr size_t kHuge = size_t{2} << 20;
  size_t map_size = (size + 4095) / 4096 * 4096;
  unsigned mfd_flags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
  if (hugepages) {
    map_size = (size + kHuge - 1) / kHuge * kHuge;
    mfd_flags |= MFD_HUGETLB;
  }
  int fd = memfd_create(hugepages ? "dpmove-hugetlb" : "dpmove", mfd_flags);
  if (fd < 0) {
    int err = errno;
    if (hugepages)
      throw_sys(err, "alloc: memfd_create(MFD_HUGETLB) failed; reserve 2 MiB pages in /proc/sys/vm/nr_hugepages or pass hugepages=False");
    throw_sys(err, "alloc: memfd_create");
  }
  // The memfd is reachable only through this fd (and /proc/<pid>/fd for processes allowed to
  // ptrace us); 0600 keeps it private to the user even where an fd leaks.
  (void)fchmod(fd, 0600);
  if (ftruncate(fd, static_cast<off_t>(map_size)) != 0) {
    int err = errno;
    ::close(fd);
    throw_sys(err, "alloc: ftruncate(memfd, " + std::to_string(map_size) + " bytes)");
  }
  // Sealed at its size: a process that maps it (an shm peer) can rely on every page staying
  // there; nobody can shrink it under a mapping and turn copies into SIGBUS.
  (void)fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  void* p = mmap(nullptr, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    ::close(fd);
    if (hugepages)
      throw_sys(err, "alloc: mmap(MAP_HUGETLB, " + std::to_string(map_size) +
                         " bytes) failed; reserve 2 MiB pages in /proc/sys/vm/nr_hugepages or pass hugepages=False");
    throw_sys(err, "alloc: mmap(" + std::to_string(map_size) + " bytes)");
  }
  auto release = [p, map_size, fd] {
    munmap(p, map_size);
    ::close(fd);
  };
  auto m = std::make_shared<Memory>(static_cast<uint8_t*>(p), size, true, std::move(release),
                                    hugepages ? "hugetlb" : "anonymous");
  m->memfd_ = fd;
  m->memfd_size_ = map_size;
  return m;
}

int Memory::register_with(const std::shared_ptr<BufferRegistry>& registry) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!chunks_.empty()) return 0;
  std::vector<RegChunk> chunks;
  for (size_t off = 0; off < size_; off += kMaxRegChunk) {
    size_t len = std::min(kMaxRegChunk, size_ - off);
    int slot = registry->register_buffer(base_ + off, len);
    if (slot < 0) {
      for (auto& c : chunks) registry->unregister_buffer(c.slot);
      reg_error_ = "io_uring_register_buffers: " + errno_str(-slot);
      return slot;
    }
    chunks.push_back({off, len, slot});
  }
  chunks_ = std::move(chunks);
  registry_ = registry;
  reg_error_.clear();
  return 0;
}

void Memory::unregister() {
  std::vector<RegChunk> chunks;
  std::shared_ptr<BufferRegistry> reg;
  {
    std::lock_guard<std::mutex> lk(mu_);
    chunks.swap(chunks_);
    reg = registry_.lock();
    registry_.reset();
  }
  if (reg)
    for (auto& c : chunks) reg->unregister_buffer(c.slot);
}

void Memory::close() {
  // Registration stays until ~Memory: a request that holds this memory may have prepared an
  // SQE naming the slot, and clearing (or reusing) the slot under it would fail that I/O.
  {
    std::lock_guard<std::mutex> lk(mu_);
    closed_.store(true, std::memory_order_release);
  }
  run_close_hooks();
}

int Memory::find_slot(size_t off, size_t len) const noexcept {
  // No lock on this per-operation path: chunks_ is written only by register_with() before the
  // Memory is handed out and by ~Memory, so every reader sees it settled.
  if (chunks_.empty()) return -1;
  size_t idx = off / kMaxRegChunk;  // chunks are kMaxRegChunk apart, starting at 0
  if (idx >= chunks_.size()) return -1;
  const RegChunk& c = chunks_[idx];
  if (off + len > c.offset + c.length) return -1;
  return c.slot;
}

bool Memory::registered_elsewhere(const BufferRegistry* registry) const {
  std::lock_guard<std::mutex> lk(mu_);
  return !chunks_.empty() && registry_.lock().get() != registry;
}

bool Memory::registered() const {
  std::lock_guard<std::mutex> lk(mu_);
  return !chunks_.empty();
}

std::string Memory::registration_error() const {
  std::lock_guard<std::mutex> lk(mu_);
  return reg_error_;
}

Region::Region(std::shared_ptr<Memory> mem, size_t offset, size_t length)
    : mem_(std::move(mem)), offset_(offset), length_(length) {}

std::shared_ptr<Region> Region::slice(size_t offset, size_t length) const {
  check_open();
  if (offset > length_ || length > length_ - offset)
    throw UsageError("slice [" + std::to_string(offset) + ", +" + std::to_string(length) +
                     ") does not fit in a region of " + std::to_string(length_) + " bytes");
  return std::make_shared<Region>(mem_, offset_ + offset, length);
}

void Region::close() {
  closed_.store(true, std::memory_order_release);
  if (root_) mem_->close();
}

bool Region::closed() const noexcept { return closed_.load(std::memory_order_acquire) || mem_->closed(); }

void Region::check_open() const {
  if (closed_.load(std::memory_order_acquire)) throw ClosedError("Region is closed");
  if (mem_->closed()) throw ClosedError("Region's parent region is closed");
}

}  // namespace dpmove
