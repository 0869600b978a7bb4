"""Per-node endpoint selection, as kube-proxy programs it and the kernel executes it. Pure code.

Rules / theory of operation (sources in the README's "Model" section):

* One `Selector` per node: each node's kube-proxy programs only that node, so every node has its
  own rule set, IPVS table, rr cursor and lc counters.
* `sync(serving, now)` installs the node's view of the endpoints (ready, not terminating; the
  caller falls back to serving-terminating ones when none are ready). It is called when the node's
  kube-proxy sync completes (`kpbench.control`'s per-node sync loop); `IpvsSelector.update` is
  the same for a known change.
* iptables: rule i of n matches with probability 1/(n-i), so every endpoint gets 1/n of new
  connections. nftables: `numgen random mod n vmap`, the same distribution from one draw.
* IPVS (`IpvsSelector`): each rule, with the kernel or kube-proxy source it follows, is in its
  docstring; `kpbench.conformance` checks every decision and counter against a real kernel.
* `pick` returns an endpoint id, or None when the data plane refuses the connection; the client
  hears of a refusal only as `IcmpRateLimit` lets it.
"""

from __future__ import annotations

import functools
import heapq
import random
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from kpbench.ipvs import scheduler_of

IPVS_TIME_WAIT_SECONDS = 120.0  # TIME_WAIT (and FIN_WAIT) in ip_vs_proto_tcp.c
IPVS_CLOSE_SECONDS = 10.0  # CLOSE, after a reset
SERVER_PORT = 8080
IPVS_GRACEFUL_CHECK_SECONDS = 60.0
SH_BUCKETS = 256
MH_TABLE_SIZE = 4093
GOLDEN_RATIO_32 = 0x61C88647


class Selector(Protocol):
    """One node's data plane for one Service."""

    def sync(self, serving: Sequence[int], now: float) -> None: ...
    def pick(self, client_ip: int, client_port: int, now: float) -> int | None: ...
    def opened(self, endpoint: int, now: float) -> None: ...
    def closed(self, endpoint: int, now: float, reset: bool = False) -> None: ...
    def tick(self, now: float) -> None: ...


def iptables_probabilities(n: int) -> list[str]:
    """The `--probability` arguments kube-proxy writes for n endpoints (the last rule has none)."""
    return [f"{1.0 / (n - i):0.10f}" for i in range(n - 1)]


class RandomSelector:
    """iptables (statistic random, 1/(n-i) per rule) and nftables (numgen random mod n)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._view: tuple[int, ...] = ()

    def sync(self, serving: Sequence[int], now: float) -> None:
        self._view = tuple(serving)

    def pick(self, client_ip: int, client_port: int, now: float) -> int | None:
        view = self._view
        if not view:
            return None
        return view[int(self._rng.random() * len(view))]

    def opened(self, endpoint: int, now: float) -> None:
        pass

    def closed(self, endpoint: int, now: float, reset: bool = False) -> None:
        pass

    def tick(self, now: float) -> None:
        pass


@dataclass(slots=True, eq=False)
class Destination:
    """One real server (`struct ip_vs_dest`): the same object across a delete and re-add."""

    endpoint: int
    seq: int  # list position: larger is nearer the head (new destinations go to the head)
    weight: int = 1
    last_weight: int = 1  # the latest non-zero weight (`__ip_vs_update_dest`)
    active: int = 0
    inactive: int = 0
    mh_preference: tuple[int, int] | None = None  # mh: (offset, skip), from its address


    @property
    def overhead(self) -> int:
        return (self.active << 8) + self.inactive


def endpoint_address(endpoint: int) -> tuple[int, int]:
    """A standalone selector's (IPv4 address, port) of an endpoint: 198.18.128.0 + id, port 8080.
    The simulator passes the pods' real plan instead (`kpbench.addresses`)."""
    return (198 << 24) + (18 << 16) + (128 << 8) + endpoint, SERVER_PORT


# lc's heap holds one int per entry, `overhead << SEQ_BITS | (SEQ_MASK - seq)`: ints compare
# faster than tuples, and the order is lc's (least overhead, then nearest the head).
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1


class IpvsSelector:
    """One IPVS virtual server with kube-proxy's graceful termination; scheduler by name.

    Every rule follows the kernel (`net/netfilter/ipvs/`) or kube-proxy (kubernetes
    `pkg/proxy/ipvs/`), and `kpbench.conformance` checks each decision and counter against a
    real kernel:

    * List (`ip_vs_ctl.c __ip_vs_update_dest`): a new destination is inserted at the head.
      A deleted one (`__ip_vs_del_dest`) waits in the trash while connections are bound to it;
      adding the same address again revives that object (`ip_vs_add_dest` ->
      `ip_vs_trash_get_dest`) with its counters, at the head. Setting weight 0 keeps
      `last_weight`.
    * kube-proxy's sync (`proxier.go syncEndpoint`, `graceful_termination.go`): endpoints of
      the sync are added in the order given (kube-proxy's map order); one that comes back
      while quiesced is deleted and added again; then every endpoint that left is deleted if
      it holds no connection, else quiesced at weight 0. The graceful pass (every
      `graceful_check_seconds`, 60 s in kube-proxy) deletes quiesced destinations whose
      active + inactive connections are 0.
    * Counters (`ip_vs_proto_tcp.c`, `ip_vs_conn.c`): a connection is active from its SYN
      (SYN_RECV and ESTABLISHED are active states); closing makes it inactive (CLOSE_WAIT /
      FIN_WAIT, then TIME_WAIT) until it expires `IPVS_TIME_WAIT_SECONDS` later; a reset
      makes it inactive (CLOSE) for `IPVS_CLOSE_SECONDS`.
    * rr (`ip_vs_rr.c`): a cursor on the last chosen destination; the next pick is the first
      weight > 0 destination after it in list order, wrapping through the head. Deleting the
      cursor's destination moves the cursor to its predecessor, or to the head.
    * lc / wlc (`ip_vs_lc.c`, `ip_vs_wlc.c`, all weights 1): the least
      `(active << 8) + inactive` over weight > 0 destinations, ties to the first in list order.
    * sh (`ip_vs_sh.c`): 256 buckets filled round-robin in list order, a weight-0 destination
      still taking one bucket per round; bucket `hash_32(addr, 8)` of the client address
      (kube-proxy sets no sh-port flag); a bucket whose destination has weight 0 refuses.
    * mh (`ip_vs_mh.c`): a Maglev table of 4093 slots over the destinations with
      `last_weight` > 0 (so a quiesced one keeps its slots), offsets and skips from `hsiphash`
      with the kernel's fixed keys over each destination's address + port; the client is
      looked up by address + source port (kube-proxy sets mh-port, no fallback); a slot whose
      destination has weight 0 refuses.
    """

    def __init__(self, scheduler: str, *,
                 address_of: Callable[[int], tuple[int, int]] = endpoint_address,
                 graceful_check_seconds: float = IPVS_GRACEFUL_CHECK_SECONDS) -> None:
        if scheduler not in {"rr", "lc", "wlc", "sh", "mh"}:
            raise ValueError(f"unknown IPVS scheduler {scheduler!r}")
        self.scheduler = scheduler
        self._least = scheduler in ("lc", "wlc")
        self._rr = scheduler == "rr"
        self._address_of = address_of
        # Listed destinations; a destination enters with the largest seq and leaves before it
        # comes back, so this dict's order is ascending seq: the list order reversed.
        self.dests: dict[int, Destination] = {}
        self.trash: dict[int, Destination] = {}  # deleted, connections still bound
        self._quiesced: dict[int, Destination] = {}  # listed with weight 0
        # quiesced and holding no connection: the next graceful pass deletes them
        self._drained: dict[int, Destination] = {}
        self._by_seq: list[Destination | None] = []  # seq -> listed destination (None: deleted)
        # Connections waiting to expire, each queue in time order: (expires, destination).
        self._time_wait: deque[tuple[float, Destination]] = deque()
        self._close: deque[tuple[float, Destination]] = deque()
        self._graceful_period = graceful_check_seconds
        self._next_graceful_check = graceful_check_seconds
        # rr only: the seqs of destinations added with weight 1 (ascending); an entry whose
        # destination has left or was quiesced since is stale and skipped, and the list is
        # compacted when stale entries outnumber the `_rr_serving` live ones. The cursor: the
        # next pick is the largest serving seq below it (None: the list head); the kernel's
        # cursor is on the first listed destination at or above it.
        self._rr_seqs: list[int] = []
        self._rr_serving = 0
        self._rr_cursor: int | None = None
        # lc: a heap of keys (SEQ_BITS); an entry whose destination is gone, quiesced or has
        # another overhead now is skipped lazily. Every listed weight > 0 destination has an
        # entry with its current key.
        self._heap: list[int] = []
        # sh / mh: lookup tables, rebuilt on any change.
        self._table: list[Destination] = []  # sh buckets / mh slots
        self._table_members: set[int] = set()  # the destinations the table was built from
        self._dirty = True

    # -- list maintenance ------------------------------------------------------------------------

    def list_order(self) -> list[int]:
        """Endpoints in IPVS list order (head first), for tests and inspection."""
        return [d.endpoint for d in sorted(self.dests.values(), key=lambda d: -d.seq)]

    def _add(self, endpoint: int) -> None:
        dest = self.trash.pop(endpoint, None) or Destination(endpoint, 0)
        dest.seq = len(self._by_seq)
        dest.weight = dest.last_weight = 1
        self._by_seq.append(dest)
        self.dests[endpoint] = dest
        if self._rr:  # the largest seq: appending keeps the list sorted
            self._rr_seqs.append(dest.seq)
            self._rr_serving += 1
        self._push(dest)
        self._dirty = True

    def _unlist_rr(self) -> None:
        """rr: a destination left the serving ones (its entry in `_rr_seqs` is now stale)."""
        self._rr_serving -= 1
        if len(self._rr_seqs) > 2 * self._rr_serving + 64:
            by_seq = self._by_seq
            self._rr_seqs = [seq for seq in self._rr_seqs
                             if (dest := by_seq[seq]) is not None and dest.weight > 0]

    def _delete(self, dest: Destination) -> None:
        del self.dests[dest.endpoint]
        self._by_seq[dest.seq] = None
        if self._rr:
            if dest.weight > 0:
                self._unlist_rr()
            # ip_vs_rr_del_dest moves a cursor on `dest` to its predecessor, which is where the
            # cursor's seq now points, or to the head when `dest` had none.
            cursor = self._rr_cursor
            if cursor is not None and (not self.dests
                                       or next(reversed(self.dests.values())).seq < cursor):
                self._rr_cursor = None
        self._quiesced.pop(dest.endpoint, None)
        self._drained.pop(dest.endpoint, None)
        if dest.active + dest.inactive > 0:
            self.trash[dest.endpoint] = dest
        if dest.endpoint in self._table_members:  # beyond the table's reach: it stays the same
            self._dirty = True

    def _quiesce(self, dest: Destination) -> None:
        # sh and mh tables keep a quiesced destination's slots (their picks check the weight).
        dest.weight = 0
        self._quiesced[dest.endpoint] = dest
        if self._rr:
            self._unlist_rr()

    def _push(self, dest: Destination) -> None:
        """lc: an entry with `dest`'s current key (after its overhead changed)."""
        if self._least and dest.weight > 0:
            heap = self._heap
            heapq.heappush(heap, (dest.overhead << SEQ_BITS) | (SEQ_MASK - dest.seq))
            if len(heap) > 4 * len(self.dests) + 64:
                self._compact_heap()

    def _compact_heap(self) -> None:
        self._heap = [(d.overhead << SEQ_BITS) | (SEQ_MASK - d.seq)
                      for d in self.dests.values() if d.weight > 0]
        heapq.heapify(self._heap)

    def sync(self, serving: Sequence[int], now: float) -> None:
        wanted = set(serving)
        self.update(serving, [d.endpoint for d in self.dests.values()
                              if d.endpoint not in wanted and d.weight > 0], now)

    def update(self, added: Sequence[int], removed: Iterable[int], now: float) -> None:
        """`sync` for a known change: the endpoints that joined the node's view, in kube-proxy's
        order (any already serving are skipped), and those that left it. The simulator's fast
        path: nothing here walks every destination."""
        self.expire(now)
        for endpoint in added:
            dest = self.dests.get(endpoint)
            if dest is None:
                self._add(endpoint)
            elif dest.weight == 0:  # back from graceful termination: delete, add again
                self._delete(dest)
                self._add(endpoint)
        for endpoint in removed:
            dest = self.dests.get(endpoint)
            if dest is not None and dest.weight > 0:
                if dest.active + dest.inactive == 0:
                    self._delete(dest)
                else:
                    self._quiesce(dest)
        self.tick(now)

    def tick(self, now: float) -> None:
        """kube-proxy's graceful-termination loop, every `graceful_check_seconds`."""
        if now < self._next_graceful_check:
            return
        while self._next_graceful_check <= now:
            self._next_graceful_check += self._graceful_period
        self.graceful_pass(now)

    def graceful_pass(self, now: float) -> None:
        """Delete the quiesced destinations that no longer hold a connection, in list order
        from the tail."""
        self.expire(now)
        for dest in sorted(self._drained.values(), key=lambda d: d.seq):
            self._delete(dest)

    # -- connection accounting -------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Count the connections whose IPVS entry has expired by `now` as gone."""
        for queue in (self._time_wait, self._close):
            while queue and queue[0][0] <= now:
                _, dest = queue.popleft()
                dest.inactive -= 1
                if self.dests.get(dest.endpoint) is dest:
                    if dest.weight > 0:
                        self._push(dest)
                    elif dest.active + dest.inactive == 0:
                        self._drained[dest.endpoint] = dest
                elif dest.active + dest.inactive == 0 and self.trash.get(dest.endpoint) is dest:
                    del self.trash[dest.endpoint]  # nothing holds it: the kernel frees it

    def opened(self, endpoint: int, now: float) -> None:
        dest = self.dests.get(endpoint)
        if dest is None:
            return
        if not self._least or dest.weight == 0:
            dest.active += 1
            return
        # Hot path of lc: the destination just picked is usually the heap's top; re-key it there.
        key = (((dest.active << 8) + dest.inactive) << SEQ_BITS) | (SEQ_MASK - dest.seq)
        dest.active += 1
        heap = self._heap
        if heap and heap[0] == key:
            heapq.heapreplace(heap, key + (256 << SEQ_BITS))
        else:
            self._push(dest)

    def closed(self, endpoint: int, now: float, reset: bool = False) -> None:
        dest = self.dests.get(endpoint)
        listed = dest is not None
        if dest is None:
            dest = self.trash.get(endpoint)
            if dest is None:
                return
        dest.active -= 1
        dest.inactive += 1
        if reset:
            self._close.append((now + IPVS_CLOSE_SECONDS, dest))
        else:
            self._time_wait.append((now + IPVS_TIME_WAIT_SECONDS, dest))
        if listed:
            self._push(dest)

    # -- scheduling ------------------------------------------------------------------------------

    def pick(self, client_ip: int, client_port: int, now: float) -> int | None:
        if self._least:
            if (self._time_wait and self._time_wait[0][0] <= now) or (
                    self._close and self._close[0][0] <= now):
                self.expire(now)
            return self._pick_lc()
        if self._rr:
            return self._pick_rr()
        if self._dirty:
            self._rebuild_table()
        if not self._table:
            return None
        if self.scheduler == "sh":
            dest = self._table[sh_bucket(client_ip)]
        else:
            dest = self._table[_mh_slot((client_port + client_ip) & 0xFFFFFFFF)]
        return dest.endpoint if dest.weight > 0 else None

    def _pick_rr(self) -> int | None:
        if not self._rr_serving:
            return None
        seqs, by_seq = self._rr_seqs, self._by_seq
        # The successor in list order is the largest serving seq below the cursor; wrap to the
        # head (the largest serving seq).
        index = len(seqs) if self._rr_cursor is None else bisect_left(seqs, self._rr_cursor)
        while True:
            index = index - 1 if index > 0 else len(seqs) - 1
            dest = by_seq[seqs[index]]
            if dest is not None and dest.weight > 0:
                self._rr_cursor = dest.seq
                return dest.endpoint

    def _pick_lc(self) -> int | None:
        heap, by_seq = self._heap, self._by_seq
        while heap:
            key = heap[0]
            dest = by_seq[SEQ_MASK - (key & SEQ_MASK)]
            if (dest is not None and dest.weight > 0
                    and key >> SEQ_BITS == (dest.active << 8) + dest.inactive):
                return dest.endpoint
            heapq.heappop(heap)
        return None

    def _rebuild_table(self) -> None:
        ordered = reversed(self.dests.values())  # list order, head first
        if self.scheduler == "sh":
            dests = list(islice(ordered, SH_BUCKETS))
            self._table = [dests[i % len(dests)] for i in range(SH_BUCKETS)] if dests else []
        else:
            # Only the first MH_TABLE_SIZE can claim a slot: the table is full after one round.
            dests = list(islice((d for d in ordered if d.last_weight > 0), MH_TABLE_SIZE))
            preferences = []
            for dest in dests:
                preference = dest.mh_preference
                if preference is None:
                    address, port = self._address_of(dest.endpoint)
                    preference = dest.mh_preference = _mh_preference((address + port)
                                                                     & 0xFFFFFFFF)
                preferences.append(preference)
            self._table = [dests[i] for i in maglev_populate(preferences)]
        # Between rebuilds every table entry is the listed destination of its endpoint: adding,
        # or deleting a member, marks the table dirty.
        self._table_members = {d.endpoint for d in dests}
        self._dirty = False


def sh_bucket(client_ip: int, port: int = 0) -> int:
    """ip_vs_sh_hashkey: hash_32(port + addr, 8), the top 8 bits of a golden-ratio product."""
    return (((port + client_ip) * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> 24


_MASK64 = (1 << 64) - 1


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    """SIPROUND (include/linux/siphash.h): 64-bit adds and rotations (inlined: hot in mh)."""
    v0 = (v0 + v1) & _MASK64
    v1 = (((v1 << 13) | (v1 >> 51)) & _MASK64) ^ v0
    v0 = ((v0 << 32) | (v0 >> 32)) & _MASK64
    v2 = (v2 + v3) & _MASK64
    v3 = (((v3 << 16) | (v3 >> 48)) & _MASK64) ^ v2
    v0 = (v0 + v3) & _MASK64
    v3 = (((v3 << 21) | (v3 >> 43)) & _MASK64) ^ v0
    v2 = (v2 + v1) & _MASK64
    v1 = (((v1 << 17) | (v1 >> 47)) & _MASK64) ^ v2
    v2 = ((v2 << 32) | (v2 >> 32)) & _MASK64
    return v0, v1, v2, v3


def hsiphash_u32(value: int, key: tuple[int, int]) -> int:
    """`hsiphash(&value, 4, key)` on a 64-bit kernel (`lib/siphash.c hsiphash_1u32`).

    There it is SipHash-1-3 over one final word `(4 << 56) | value`, truncated to 32 bits.
    """
    k0, k1 = key
    v0, v1 = 0x736F6D6570736575 ^ k0, 0x646F72616E646F6D ^ k1
    v2, v3 = 0x6C7967656E657261 ^ k0, 0x7465646279746573 ^ k1
    b = (4 << 56) | (value & 0xFFFFFFFF)
    v3 ^= b
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return (v0 ^ v1 ^ v2 ^ v3) & 0xFFFFFFFF


# ip_vs_mh.c generate_hash_secret: fixed keys, not random ones.
MH_KEY_1 = (2654435761, 2654435761)
MH_KEY_2 = (2654446892, 2654446892)


# ip_vs_mh_hashkey hashes `port + address` (host order, a 32-bit sum) with hsiphash. Pure
# functions of that sum, cached: clients' addresses and ports give a few hundred thousand sums,
# and a destination keeps its own.
@functools.lru_cache(maxsize=1 << 19)
def _mh_slot(address_and_port: int) -> int:
    """The table slot a client hashes to (`ip_vs_mh_get`)."""
    return hsiphash_u32(address_and_port, MH_KEY_1) % MH_TABLE_SIZE


@functools.lru_cache(maxsize=1 << 17)
def _mh_preference(address_and_port: int) -> tuple[int, int]:
    """A destination's first slot (offset) and step (skip) in the Maglev table."""
    return (hsiphash_u32(address_and_port, MH_KEY_1) % MH_TABLE_SIZE,
            hsiphash_u32(address_and_port, MH_KEY_2) % (MH_TABLE_SIZE - 1) + 1)


def maglev_table(dests: Sequence[tuple[int, int, int]]) -> list[int]:
    """ip_vs_mh_populate for (endpoint, address, port) in list order, all weights 1.

    Destinations take turns, in list order, claiming their next preferred free slot.
    """
    slots = maglev_populate([_mh_preference((a + p) & 0xFFFFFFFF) for _, a, p in dests])
    return [dests[i][0] for i in slots]


def maglev_populate(preferences: Sequence[tuple[int, int]]) -> list[int]:
    """`maglev_table` from each destination's (offset, skip) (`_mh_preference`), in list
    order: each slot holds the position of its destination in `preferences`."""
    if not preferences:
        return []
    size = MH_TABLE_SIZE
    perms = [offset for offset, _ in preferences]
    skips = [skip for _, skip in preferences]
    table = [-1] * size
    filled = 0
    while True:
        for i in range(len(preferences)):
            slot, skip = perms[i], skips[i]
            while table[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            perms[i] = slot
            table[slot] = i
            filled += 1
            if filled == size:
                return table


ICMP_RATELIMIT_SECONDS = 1.0  # net.ipv4.icmp_ratelimit: 1000 ms (net/ipv4/icmp.c)
XRLIM_BURST_FACTOR = 6  # net/ipv4/inetpeer.c


class IcmpRateLimit:
    """One node's limit on ICMP errors per destination address (`icmpv4_xrlim_allow`).

    A connection the data plane refuses (IPVS: no destination, or a weight-0 one in sh/mh,
    `ip_vs_leave`; iptables/nftables: the no-endpoints REJECT) is answered with an ICMP port
    unreachable from `icmp_send`, which dest-unreachable errors reach only through a token bucket
    per destination address (`inet_peer_xrlim_allow`, `net/ipv4/inetpeer.c`): one token per
    `icmp_ratelimit`, at most `XRLIM_BURST_FACTOR` saved, and a new peer starts full. A refusal
    without a token is a silent drop: the client's SYN is retransmitted. Each node's network
    namespace has its own peers.
    """

    def __init__(self, interval: float = ICMP_RATELIMIT_SECONDS) -> None:
        # Whole microseconds, as the kernel counts whole jiffies: no rounding drift.
        self.interval_us = round(interval * 1e6)
        self._tokens: dict[int, tuple[int, int]] = {}  # address -> (tokens, last), in µs

    def allow(self, address: int, now: float) -> bool:
        now_us = round(now * 1e6)
        cap = XRLIM_BURST_FACTOR * self.interval_us
        tokens, last = self._tokens.get(address, (cap, now_us))
        tokens = min(tokens + now_us - last, cap)
        allowed = tokens >= self.interval_us
        self._tokens[address] = (tokens - self.interval_us if allowed else tokens, now_us)
        return allowed


def make_selector(mode: str, rng: random.Random,
                  address_of: Callable[[int], tuple[int, int]]) -> Selector:
    if mode in ("iptables", "nftables"):
        return RandomSelector(rng)
    if mode.startswith("ipvs-"):
        return IpvsSelector(scheduler_of(mode), address_of=address_of)
    raise ValueError(f"unknown mode {mode!r}")
