// What crosses the wire between engines: connection metadata, remote-region handles and the
// frames of the data and control connections. Everything received is untrusted: parse()
// functions check every length against the bytes present and throw UsageError (ValueError in
// Python) saying what was wrong; they never read past the input.
//
// Byte order: little-endian on the wire (static_assert'ed host order; dpmove runs on x86_64
// and aarch64 Linux, both little-endian).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace dpmove {
namespace net {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "dpmove's wire format assumes a little-endian host");

constexpr uint16_t kMetadataVersion = 1;
constexpr size_t kMaxMetadataBytes = 64 * 1024;
constexpr size_t kMaxNotifyBytes = 64 * 1024;  // notification payload cap

using Id128 = std::array<uint8_t, 16>;
std::string hex(const Id128& id);
Id128 random_id();

struct Endpoint {
  int family = 0;  // AF_INET or AF_INET6
  uint16_t port = 0;
  std::array<uint8_t, 16> addr{};  // 4 bytes used for AF_INET
  std::string str() const;         // "127.0.0.1:5000", "[::1]:5000"
};

// An RDMA port the engine can use (informational for transport choice; queue pairs are set
// up over the control connection).
struct VerbsPort {
  std::string device;
  uint8_t port = 1;
  uint16_t lid = 0;
  std::array<uint8_t, 16> gid{};
};

// Versioned, self-describing: "DPMVMETA", u16 version, u16 reserved, u32 total length, then
// TLV fields (u16 type, u16 length, value). Unknown types are skipped, so a newer engine's
// metadata parses here as long as the fields this version needs are present.
struct Metadata {
  Id128 engine_id{};  // random per Engine instance: a restarted peer has a new one
  Id128 boot_id{};    // /proc/sys/kernel/random/boot_id: same value = same host (same kernel)
  uint64_t netns = 0; // inode of /proc/self/ns/net: abstract unix sockets are per namespace
  uint32_t pid = 0, uid = 0;
  std::string hostname;
  std::string name;  // the engine's display name
  std::vector<Endpoint> tcp;
  std::string unix_name;  // abstract unix socket name, without the leading NUL
  std::vector<VerbsPort> verbs;

  std::vector<uint8_t> encode() const;
  static Metadata parse(const uint8_t* p, size_t n);
  std::string describe() const;  // "name (pid 123 on host, tcp 127.0.0.1:4000)"
};

// Handle of an exposed region: what a peer names it by. 48 bytes: "DPMH", u16 version,
// u16 flags, u32 key, u32 reserved, u64 size, Id128 engine, u64 checksum-free reserved.
enum HandleFlags : uint16_t { kHandleWritable = 1, kHandleShm = 2 };
struct RemoteHandle {
  Id128 engine{};
  uint32_t key = 0;
  uint16_t flags = 0;
  uint64_t size = 0;
  std::vector<uint8_t> encode() const;
  static RemoteHandle parse(const uint8_t* p, size_t n);
};

// ---- frames -------------------------------------------------------------------------------

constexpr uint32_t kFrameMagic = 0x464d5044;  // "DPMF"

enum class FrameType : uint16_t {
  kHello = 1,    // client -> server, first frame: key = channel kind, aux = stream index,
                 // req = session id, offset = streams in the session, trailer = HelloBody
  kHelloOk = 2,  // server -> client
  kError = 3,    // either way: aux = errno, trailer = message; the connection then closes
  kWrite = 4,    // tcp: key, aux = entry index, req, offset in region, length = payload bytes
  kEnd = 5,      // end of a request on this stream: req, aux = entries sent on this stream,
                 // offset = streams the request uses, key = total entries of the request,
                 // flags: kEndNotify (trailer starts with notify bytes, extra = their length),
                 // kEndExtents (trailer then holds `aux` Extent records: shm)
  kAck = 6,      // server -> client, on the request's primary stream once every stream ended:
                 // req, aux = failure records in the trailer (AckFailure), extra = 1 when a
                 // notification was delivered
  kMap = 7,      // shm client -> server: key. Reply kMapOk with the memfd (SCM_RIGHTS),
                 // offset = region offset in the memfd, length = region size, extra = memfd size
  kMapOk = 8,
  kCtrl = 9,     // transport-specific control message (verbs queue-pair exchange); key = op
  kCtrlOk = 10,
};

enum FrameFlags : uint16_t { kEndNotify = 1, kEndExtents = 2, kEndPrimary = 4 };

// kVerbs: the verbs transport's control connection (queue-pair exchange, region resolution,
// notification bytes), served by the handler net_verbs.cc registers.
enum class Channel : uint32_t { kTcpData = 1, kShmData = 2, kControl = 3, kVerbs = 4 };

struct Frame {
  uint32_t magic = kFrameMagic;
  uint16_t type = 0;
  uint16_t flags = 0;
  uint32_t key = 0;
  uint32_t aux = 0;
  uint64_t req = 0;
  uint64_t offset = 0;
  uint64_t length = 0;  // payload (kWrite) or trailer bytes
  uint64_t extra = 0;
};
static_assert(sizeof(Frame) == 48, "Frame is 48 bytes on the wire");

struct HelloBody {
  Id128 server_engine;  // whom the client believes it is talking to (from metadata)
  Id128 client_engine;
  char client_name[64];  // NUL-padded display name of the client engine
};
static_assert(sizeof(HelloBody) == 96, "HelloBody is 96 bytes");

struct Extent {  // shm: one entry the client copied
  uint32_t key;
  uint32_t entry;
  uint64_t offset;
  uint64_t length;
};
static_assert(sizeof(Extent) == 24, "Extent is 24 bytes");

struct AckFailure {
  uint32_t entry;
  int32_t status;  // -errno
};
static_assert(sizeof(AckFailure) == 8, "AckFailure is 8 bytes");

// Upper bound of any trailer a receiver accepts (extents of a 1M-entry request + notify).
constexpr uint64_t kMaxTrailer = (uint64_t{1} << 20) * sizeof(Extent) + kMaxNotifyBytes;

// Host identity of this process, cached.
const Id128& local_boot_id();
uint64_t local_netns();

}  // namespace net
}  // namespace dpmove
