#include "dpmove/probe.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>

#include "dpmove/file.h"
#include "dpmove/status.h"
#if DPMOVE_HAVE_URING
#include "dpmove/uring.h"
#endif

namespace dpmove {

std::map<std::string, std::string> probe_io_uring() {
#if DPMOVE_HAVE_URING
  UringProbe p = probe_uring();
  auto out = p.facts;
  out["compiled"] = "yes";
  out["usable"] = p.usable ? "yes" : "no";
  out["reason"] = p.reason;
  return out;
#else
  return {{"compiled", "no"}, {"usable", "no"},
          {"reason", "built without liburing (DPMOVE_WITH_URING=OFF or liburing-dev missing at build time)"}};
#endif
}

namespace {
std::string fs_name(long type) {
  switch (static_cast<unsigned long>(type)) {
    case EXT4_SUPER_MAGIC: return "ext2/3/4";
    case XFS_SUPER_MAGIC: return "xfs";
    case BTRFS_SUPER_MAGIC: return "btrfs";
    case TMPFS_MAGIC: return "tmpfs";
    case NFS_SUPER_MAGIC: return "nfs";
    case OVERLAYFS_SUPER_MAGIC: return "overlayfs";
    case 0x65735546: return "fuse";
    case 0x0BD00BD0: return "lustre";
    case 0x00C36400: return "ceph";
    default: {
      char buf[32];
      snprintf(buf, sizeof(buf), "0x%lx", static_cast<unsigned long>(type));
      return buf;
    }
  }
}
}  // namespace

std::map<std::string, std::string> probe_direct(const std::string& path) {
  std::map<std::string, std::string> out;
  out["path"] = path;
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    out["direct"] = "no";
    out["reason"] = "stat: " + errno_str(errno);
    return out;
  }
  struct statfs sfs {};
  if (statfs(path.c_str(), &sfs) == 0) out["fs"] = fs_name(sfs.f_type);
  int fd;
  if (S_ISDIR(st.st_mode)) {
    fd = ::open(path.c_str(), O_TMPFILE | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EOPNOTSUPP) {
      out["direct"] = "unknown";
      out["reason"] = "filesystem has no O_TMPFILE; pass a file path to probe";
      return out;
    }
  } else {
    fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  }
  if (fd < 0) {
    out["direct"] = "no";
    out["reason"] = "open(O_DIRECT): " + errno_str(errno);
    return out;
  }
  DioAlign a = query_dio_align(fd);
  ::close(fd);
  if (a.reported && a.mem_align == 0) {
    out["direct"] = "no";
    out["reason"] = "statx(STATX_DIOALIGN) reports no direct I/O support";
    return out;
  }
  out["direct"] = "yes";
  out["reason"] = "open(O_DIRECT) accepted";
  out["mem_align"] = std::to_string(a.reported ? a.mem_align : 4096);
  out["offset_align"] = std::to_string(a.reported ? a.offset_align : 4096);
  out["alignment_source"] = a.reported ? "statx(STATX_DIOALIGN)" : "assumed 4096 (kernel did not report)";
  return out;
}

}  // namespace dpmove
