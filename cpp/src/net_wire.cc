#include "dpmove/net_wire.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <mutex>

#include "dpmove/status.h"

namespace dpmove {
namespace net {

namespace {

enum Tlv : uint16_t {
  kTEngineId = 1,
  kTBootId = 2,
  kTNetns = 3,
  kTPid = 4,
  kTUid = 5,
  kTHostname = 6,
  kTName = 7,
  kTTcp = 8,   // u8 family (4|6), u8 pad, u16 port, addr (4|16)
  kTUnix = 9,  // abstract socket name
  kTVerbs = 10,  // u8 port, u8 pad, u16 lid, gid[16], device name
};

constexpr char kMetaMagic[8] = {'D', 'P', 'M', 'V', 'M', 'E', 'T', 'A'};
constexpr char kHandleMagic[4] = {'D', 'P', 'M', 'H'};
constexpr size_t kHandleBytes = 48;
constexpr size_t kMaxString = 255;

void put(std::vector<uint8_t>& out, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}
template <class T>
void put_v(std::vector<uint8_t>& out, T v) { put(out, &v, sizeof v); }

void put_tlv(std::vector<uint8_t>& out, uint16_t type, const void* p, size_t n) {
  if (n > 0xffff) throw UsageError("metadata field too long");
  put_v<uint16_t>(out, type);
  put_v<uint16_t>(out, static_cast<uint16_t>(n));
  put(out, p, n);
}

[[noreturn]] void bad(const std::string& what) { throw UsageError("invalid dpmove metadata: " + what); }

template <class T>
T get_v(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

std::string checked_string(const uint8_t* p, size_t n, const char* field) {
  if (n > kMaxString) bad(std::string(field) + " is " + std::to_string(n) + " bytes, at most " + std::to_string(kMaxString) + " allowed");
  std::string s(reinterpret_cast<const char*>(p), n);
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f) bad(std::string(field) + " contains a control byte");
  return s;
}

}  // namespace

std::string hex(const Id128& id) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t b : id) {
    s += d[b >> 4];
    s += d[b & 15];
  }
  return s;
}

Id128 random_id() {
  Id128 id;
  size_t got = 0;
  while (got < id.size()) {
    ssize_t r = getrandom(id.data() + got, id.size() - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw_sys(errno, "getrandom");
    }
    got += static_cast<size_t>(r);
  }
  return id;
}

std::string Endpoint::str() const {
  char buf[INET6_ADDRSTRLEN] = {0};
  inet_ntop(family, addr.data(), buf, sizeof buf);
  if (family == AF_INET6) return "[" + std::string(buf) + "]:" + std::to_string(port);
  return std::string(buf) + ":" + std::to_string(port);
}

const Id128& local_boot_id() {
  static Id128 id = [] {
    Id128 r{};
    std::ifstream f("/proc/sys/kernel/random/boot_id");
    std::string s;
    std::getline(f, s);
    // "xxxxxxxx-xxxx-...": fold the hex digits into 16 bytes.
    size_t k = 0;
    int nib = -1;
    for (char c : s) {
      int v = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
      if (v < 0) continue;
      if (nib < 0) {
        nib = v;
      } else if (k < r.size()) {
        r[k++] = static_cast<uint8_t>(nib << 4 | v);
        nib = -1;
      }
    }
    return r;
  }();
  return id;
}

uint64_t local_netns() {
  static uint64_t ino = [] {
    struct stat st;
    return stat("/proc/self/ns/net", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
  }();
  return ino;
}

std::vector<uint8_t> Metadata::encode() const {
  std::vector<uint8_t> out;
  put(out, kMetaMagic, sizeof kMetaMagic);
  put_v<uint16_t>(out, kMetadataVersion);
  put_v<uint16_t>(out, 0);
  put_v<uint32_t>(out, 0);  // total length, patched below
  put_tlv(out, kTEngineId, engine_id.data(), 16);
  put_tlv(out, kTBootId, boot_id.data(), 16);
  put_tlv(out, kTNetns, &netns, 8);
  put_tlv(out, kTPid, &pid, 4);
  put_tlv(out, kTUid, &uid, 4);
  put_tlv(out, kTHostname, hostname.data(), std::min(hostname.size(), kMaxString));
  put_tlv(out, kTName, name.data(), std::min(name.size(), kMaxString));
  for (const Endpoint& e : tcp) {
    std::vector<uint8_t> v;
    put_v<uint8_t>(v, e.family == AF_INET6 ? 6 : 4);
    put_v<uint8_t>(v, 0);
    put_v<uint16_t>(v, e.port);
    put(v, e.addr.data(), e.family == AF_INET6 ? 16 : 4);
    put_tlv(out, kTTcp, v.data(), v.size());
  }
  if (!unix_name.empty()) put_tlv(out, kTUnix, unix_name.data(), unix_name.size());
  for (const VerbsPort& vp : verbs) {
    std::vector<uint8_t> v;
    put_v<uint8_t>(v, vp.port);
    put_v<uint8_t>(v, 0);
    put_v<uint16_t>(v, vp.lid);
    put(v, vp.gid.data(), 16);
    put(v, vp.device.data(), std::min(vp.device.size(), kMaxString));
    put_tlv(out, kTVerbs, v.data(), v.size());
  }
  uint32_t total = static_cast<uint32_t>(out.size());
  std::memcpy(out.data() + 12, &total, 4);
  return out;
}

Metadata Metadata::parse(const uint8_t* p, size_t n) {
  if (n < 16) bad("got " + std::to_string(n) + " bytes, a header alone is 16 (was it truncated?)");
  if (std::memcmp(p, kMetaMagic, 8) != 0) bad("does not start with \"DPMVMETA\" (not bytes from Engine.metadata())");
  uint16_t ver = get_v<uint16_t>(p + 8);
  if (ver != kMetadataVersion)
    bad("version " + std::to_string(ver) + "; this dpmove reads version " + std::to_string(kMetadataVersion));
  uint32_t total = get_v<uint32_t>(p + 12);
  if (total != n) bad("header says " + std::to_string(total) + " bytes, got " + std::to_string(n) + " (truncated or padded)");
  if (n > kMaxMetadataBytes) bad("larger than " + std::to_string(kMaxMetadataBytes) + " bytes");
  Metadata m;
  bool have_id = false, have_boot = false;
  size_t off = 16;
  while (off < n) {
    if (n - off < 4) bad("field header cut off at byte " + std::to_string(off));
    uint16_t type = get_v<uint16_t>(p + off);
    uint16_t len = get_v<uint16_t>(p + off + 2);
    off += 4;
    if (len > n - off) bad("field " + std::to_string(type) + " claims " + std::to_string(len) + " bytes, " + std::to_string(n - off) + " left");
    const uint8_t* v = p + off;
    auto want = [&](size_t w, const char* f) {
      if (len != w) bad(std::string(f) + " is " + std::to_string(len) + " bytes, expected " + std::to_string(w));
    };
    switch (type) {
      case kTEngineId: want(16, "engine id"); std::memcpy(m.engine_id.data(), v, 16); have_id = true; break;
      case kTBootId: want(16, "boot id"); std::memcpy(m.boot_id.data(), v, 16); have_boot = true; break;
      case kTNetns: want(8, "netns"); m.netns = get_v<uint64_t>(v); break;
      case kTPid: want(4, "pid"); m.pid = get_v<uint32_t>(v); break;
      case kTUid: want(4, "uid"); m.uid = get_v<uint32_t>(v); break;
      case kTHostname: m.hostname = checked_string(v, len, "hostname"); break;
      case kTName: m.name = checked_string(v, len, "name"); break;
      case kTTcp: {
        if (len < 4) bad("tcp endpoint shorter than 4 bytes");
        Endpoint e;
        uint8_t fam = v[0];
        e.port = get_v<uint16_t>(v + 2);
        if (fam == 4) { want(8, "IPv4 endpoint"); e.family = AF_INET; std::memcpy(e.addr.data(), v + 4, 4); }
        else if (fam == 6) { want(20, "IPv6 endpoint"); e.family = AF_INET6; std::memcpy(e.addr.data(), v + 4, 16); }
        else bad("tcp endpoint family " + std::to_string(fam) + " (expected 4 or 6)");
        if (e.port == 0) bad("tcp endpoint port 0");
        if (m.tcp.size() >= 16) bad("more than 16 tcp endpoints");
        m.tcp.push_back(e);
        break;
      }
      case kTUnix:
        if (len == 0 || len > 100) bad("unix socket name of " + std::to_string(len) + " bytes (1..100 allowed)");
        m.unix_name = checked_string(v, len, "unix socket name");
        break;
      case kTVerbs: {
        if (len < 20) bad("verbs port shorter than 20 bytes");
        VerbsPort vp;
        vp.port = v[0];
        vp.lid = get_v<uint16_t>(v + 2);
        std::memcpy(vp.gid.data(), v + 4, 16);
        vp.device = checked_string(v + 20, len - 20u, "verbs device name");
        if (m.verbs.size() >= 16) bad("more than 16 verbs ports");
        m.verbs.push_back(vp);
        break;
      }
      default: break;  // a newer field: skip
    }
    off += len;
  }
  if (!have_id) bad("no engine id");
  if (!have_boot) bad("no host id");
  if (m.tcp.empty() && m.unix_name.empty()) bad("no endpoint to connect to");
  return m;
}

std::string Metadata::describe() const {
  std::string s = (name.empty() ? "engine " + hex(engine_id).substr(0, 8) : "'" + name + "'") + " (pid " +
                  std::to_string(pid) + (hostname.empty() ? "" : " on " + hostname);
  if (!tcp.empty()) s += ", tcp " + tcp.front().str();
  return s + ")";
}

std::vector<uint8_t> RemoteHandle::encode() const {
  std::vector<uint8_t> out;
  put(out, kHandleMagic, 4);
  put_v<uint16_t>(out, 1);
  put_v<uint16_t>(out, flags);
  put_v<uint32_t>(out, key);
  put_v<uint32_t>(out, 0);
  put_v<uint64_t>(out, size);
  put(out, engine.data(), 16);
  put_v<uint64_t>(out, 0);
  return out;
}

RemoteHandle RemoteHandle::parse(const uint8_t* p, size_t n) {
  if (n != kHandleBytes)
    throw UsageError("invalid remote handle: " + std::to_string(n) + " bytes, expected " + std::to_string(kHandleBytes));
  if (std::memcmp(p, kHandleMagic, 4) != 0) throw UsageError("invalid remote handle: not bytes from RemoteRegion.to_bytes()");
  if (get_v<uint16_t>(p + 4) != 1) throw UsageError("invalid remote handle: unknown version " + std::to_string(get_v<uint16_t>(p + 4)));
  RemoteHandle h;
  h.flags = get_v<uint16_t>(p + 6);
  h.key = get_v<uint32_t>(p + 8);
  h.size = get_v<uint64_t>(p + 16);
  std::memcpy(h.engine.data(), p + 24, 16);
  return h;
}

}  // namespace net
}  // namespace dpmove
