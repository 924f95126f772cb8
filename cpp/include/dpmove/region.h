// Host memory that requests read into and write from.
//
// Memory is one contiguous range with exactly one owner of its storage: either a mapping
// dpmove made (page-aligned, optionally hugetlb), backed by a memfd so that it can be shared
// with a peer process on the same host, or a Python buffer it exported (the release callback
// gives the buffer back; such memory cannot be shared through shm). Region is a view [offset, offset + length) of a
// Memory; slices share the Memory, so a slice keeps its parent's storage alive. Requests hold a
// shared_ptr to the Region they use, so storage outlives every I/O that may still touch it,
// even when the Python objects are gone.
//
// Registration: Memory is registered with the engine's BufferRegistry (io_uring fixed buffers)
// in chunks of at most kMaxRegChunk bytes, one registry slot each. Registration is an
// optimisation: when it fails (RLIMIT_MEMLOCK, file-backed memory) the region still works
// through unregistered I/O and registration_error() says why.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace dpmove {

namespace gpu {
class GpuApi;
}

// The kernel caps one fixed buffer at 1 GiB.
constexpr size_t kMaxRegChunk = size_t{1} << 30;

class BufferRegistry {
 public:
  virtual ~BufferRegistry() = default;
  // Registers [addr, addr + len) on every ring. Returns a slot >= 0, or -errno.
  // Thread-safe.
  virtual int register_buffer(void* addr, size_t len) = 0;
  // Gives the slot back. In-flight I/O that used it stays valid (the kernel holds its own
  // reference until that I/O completes). Thread-safe.
  virtual void unregister_buffer(int slot) = 0;
};

struct RegChunk {
  size_t offset;  // from Memory base, bytes
  size_t length;  // bytes, <= kMaxRegChunk
  int slot;
};

class Memory {
 public:
  // `release` frees the storage; it runs once, from the destructor, on whatever thread drops
  // the last reference (a worker thread included).
  Memory(uint8_t* base, size_t size, bool writable, std::function<void()> release, std::string kind);
  ~Memory();
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;

  // Allocates `size` bytes of zeroed, page-aligned memory: a memfd (mode 0600, close-on-exec)
  // mapped MAP_SHARED, so a peer that receives the fd maps the same pages. hugepages:
  // MFD_HUGETLB (size rounded up to 2 MiB). Throws SysError.
  static std::shared_ptr<Memory> allocate(size_t size, bool hugepages);

  // The memfd behind this memory (owned here, closed by ~Memory) and the byte offset of base()
  // in it; -1 when the memory is not shareable (a wrapped Python buffer).
  int memfd() const noexcept { return memfd_; }
  size_t memfd_size() const noexcept { return memfd_size_; }

  // Registers the whole range with `registry`, chunk by chunk. Returns 0 or -errno; on
  // failure nothing stays registered and registration_error() holds the reason.
  // Call only before the Memory is shared (Engine::allocate / wrap do): find_slot() reads the
  // chunk table without a lock.
  int register_with(const std::shared_ptr<BufferRegistry>& registry);

  // Slot whose chunk contains [off, off + len) or -1 (unregistered, or the range crosses a
  // chunk boundary). `off` is from the Memory base.
  int find_slot(size_t off, size_t len) const noexcept;
  // True when registered with a registry other than `registry` (another engine's, or one
  // that is gone): on `registry`'s rings these slot numbers name other buffers.
  bool registered_elsewhere(const BufferRegistry* registry) const;

  uint8_t* base() const noexcept { return base_; }
  size_t size() const noexcept { return size_; }
  bool writable() const noexcept { return writable_; }
  const std::string& kind() const noexcept { return kind_; }
  bool registered() const;
  std::string registration_error() const;

  // --- GPU ---
  // Device memory: base() is a device virtual address on `device` of `api` (for the emulated
  // provider, host memory standing in for it). Such memory is never dereferenced on the host:
  // file I/O, the buffer protocol and shm refuse it. Set once, before the Memory is shared.
  void set_device(gpu::GpuApi* api, int device) noexcept { gpu_ = api, device_ = device; }
  bool is_device() const noexcept { return device_ >= 0; }
  int device() const noexcept { return device_; }
  gpu::GpuApi* gpu_api() const noexcept { return gpu_; }
  // Host memory pinned and mapped for copies (cuMemHostRegister): `alias` is its address in
  // the devices' address space; `unpin` runs from ~Memory before the storage is released.
  // On failure pin_error says why (copies then refuse this memory). Set once, before sharing.
  void set_pinned(uint64_t alias, std::function<void()> unpin) {
    pinned_ = true, device_alias_ = alias, unpin_ = std::move(unpin);
  }
  void set_pin_error(std::string why) { pin_error_ = std::move(why); }
  bool pinned() const noexcept { return pinned_; }
  uint64_t device_alias() const noexcept { return device_alias_; }
  const std::string& pin_error() const noexcept { return pin_error_; }
  // Called once from close() (the root view closing) or ~Memory, whichever is first: lets an
  // owner of derived resources (a cnic exposure) give them up. Thread-safe.
  void on_close(std::function<void()> hook);

  // Marks the memory closed for new requests (done when its root view closes). The
  // registration and the storage stay until the last holder is gone.
  void close();
  bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }

 private:
  void unregister();  // from ~Memory only, when no request can use the slots any more
  uint8_t* base_;
  size_t size_;
  bool writable_;
  std::function<void()> release_;
  std::string kind_;
  mutable std::mutex mu_;
  std::vector<RegChunk> chunks_;  // sorted by offset, contiguous, cover [0, size) when registered
  std::weak_ptr<BufferRegistry> registry_;
  std::string reg_error_;
  std::atomic<bool> closed_{false};
  int memfd_ = -1;
  size_t memfd_size_ = 0;
  gpu::GpuApi* gpu_ = nullptr;
  int device_ = -1;
  bool pinned_ = false;
  uint64_t device_alias_ = 0;
  std::function<void()> unpin_;
  std::string pin_error_;
  std::vector<std::function<void()>> close_hooks_;  // guarded by mu_
  void run_close_hooks();
};

class Region {
 public:
  Region(std::shared_ptr<Memory> mem, size_t offset, size_t length);

  // A sub-view [offset, offset + length) of this region; shares the Memory. Throws UsageError
  // when it does not fit.
  std::shared_ptr<Region> slice(size_t offset, size_t length) const;

  uint8_t* data() const noexcept { return mem_->base() + offset_; }
  size_t size() const noexcept { return length_; }
  size_t offset_in_memory() const noexcept { return offset_; }
  bool writable() const noexcept { return mem_->writable(); }
  const std::shared_ptr<Memory>& memory() const noexcept { return mem_; }

  // Closing a view makes it unusable for new requests. Closing the root view (the one the
  // engine returned) closes every view of the memory; registration and storage are released
  // when the last request or slice that holds it is gone.
  void close();
  bool closed() const noexcept;
  void check_open() const;  // throws ClosedError

  void set_root(bool root) noexcept { root_ = root; }
  bool is_root() const noexcept { return root_; }

 private:
  std::shared_ptr<Memory> mem_;
  size_t offset_;
  size_t length_;
  bool root_ = false;
  std::atomic<bool> closed_{false};
};

}  // namespace dpmove
