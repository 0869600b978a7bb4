"""Pod addresses: each node hands out its pods' addresses in creation order, from .2 up.

kind's CNI (kindnet: the `ptp` plugin with `host-local` IPAM over the node's pod CIDR, as in
kind's `images/kindnetd/cmd/kindnetd/cni.go`) gives a node's first pod the address after the
gateway, `.2` (host-local's default `rangeStart`), and every later pod the next free address
after the last one it handed out (containernetworking/plugins
`plugins/ipam/host-local/backend/allocator/allocator.go`, `GetIter` from `LastReservedIP`), so a
released address is not reused before the range wraps. The lab assigns addresses this way,
198.18.<node>.<host>, and the simulator follows the same plan in the same creation order (L7
proxy pods, the initial backend pods, the client pods, then every later backend pod): IPVS `sh`
and `mh` hash the client's address, and `mh` the real servers' too, so which clients a quiesced
pod's bucket refuses depends on the addresses, not only on how many clients there are.
"""

from __future__ import annotations

POD_NETWORK = (198 << 24) + (18 << 16)  # 198.18.0.0, RFC 2544 (benchmarking)
FIRST_HOST = 2  # .1 is the node's gateway address on every pod link
LAST_HOST = 254  # a node's /24 ends here: the lab refuses more, the simulator goes on


def pod_address(node: int, host: int) -> int:
    """198.18.<node>.<host> as an integer. Hosts past .254 (only the simulator's large runs
    have them; no packet is ever sent to one) continue in 198.19.<16 x node + host / 256>.x."""
    if host <= LAST_HOST and node < 256:
        return POD_NETWORK + (node << 8) + host
    return POD_NETWORK + (1 << 16) + ((node * 4096 + host) & 0xFFFF)


def dotted(address: int) -> str:
    return ".".join(str((address >> shift) & 255) for shift in (24, 16, 8, 0))


class PodAddresses:
    """The next host number of each node; `allocate` hands out one and moves on."""

    def __init__(self, nodes: int) -> None:
        self._next = [FIRST_HOST] * nodes

    def allocate(self, node: int) -> int:
        host = self._next[node]
        self._next[node] += 1
        return host
