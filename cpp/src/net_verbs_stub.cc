// Builds without <infiniband/verbs.h> (DPMOVE_WITH_VERBS=OFF or rdma-core headers absent):
// no verbs ports, no receiver handler. make_verbs_transport() and verbs_usable() say why in
// net_peer.cc.
#include "dpmove/net.h"

namespace dpmove {
namespace net {

std::vector<VerbsPort> verbs_local_ports() { return {}; }
void install_verbs_control_handler() {}

}  // namespace net
}  // namespace dpmove
