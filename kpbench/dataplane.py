"""Per-node endpoint selection, as kube-proxy programs it and the kernel executes it. Pure code.

Rules / theory of operation (sources in the README's "Model" section):

* One `Selector` per node: each node's kube-proxy programs only that node, so every node has its
  own rule set, IPVS table, rr cursor and lc counters.
* `sync(serving, now)` installs the node's view of the endpoints (ready, not terminating; the
  caller falls back to serving-terminating ones when none are ready). It is called when the node's
  kube-proxy syncs, `endpoint_sync_seconds` after a change.
* iptables: rule i of n matches with probability 1/(n-i), so every endpoint gets 1/n of new
  connections. nftables: `numgen random mod n vmap`, the same distribution from one draw.
* IPVS: destinations are a list; new ones are inserted at the head. A removed TCP endpoint is
  set to weight 0 and deleted once its active + inactive connections reach 0, checked every 60 s
  (kube-proxy's graceful termination). Inactive = closed less than 120 s ago (TIME_WAIT).
  - rr: a cursor moves to the next weight>0 destination in list order, wrapping.
  - lc / wlc (all weights are 1): least `(active << 8) + inactive`, ties to the earliest in list
    order (the most recently added). Kept in a heap, never a scan over all destinations.
  - sh: 256 buckets filled round-robin from the list head (weight-0 destinations keep their
    buckets), rebuilt on every change; bucket = hash_32 of the client IP only (kube-proxy sets no
    sh-port flag). A bucket whose destination has weight 0 refuses the connection.
  - mh: Maglev lookup table (prime size 4093) over weight>0 destinations, hashed on client IP and
    port (kube-proxy sets mh-port). The permutation uses blake2b, not the kernel's siphash keys.
* `pick` returns an endpoint id, or None when the data plane refuses the connection.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kpbench.ipvs import scheduler_of

IPVS_TIME_WAIT_SECONDS = 120.0
IPVS_GRACEFUL_CHECK_SECONDS = 60.0
SH_BUCKETS = 256
MH_TABLE_SIZE = 4093
GOLDEN_RATIO_32 = 0x61C88647


class Selector(Protocol):
    """One node's data plane for one Service."""

    def sync(self, serving: Sequence[int], now: float) -> None: ...
    def pick(self, client_ip: int, client_port: int, now: float) -> int | None: ...
    def opened(self, endpoint: int, now: float) -> None: ...
    def closed(self, endpoint: int, now: float) -> None: ...
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

    def closed(self, endpoint: int, now: float) -> None:
        pass

    def tick(self, now: float) -> None:
        pass


@dataclass(slots=True)
class Destination:
    endpoint: int
    seq: int  # insertion order; list order is descending seq (new ones at the head)
    weight: int = 1
    active: int = 0
    inactive: int = 0
    version: int = 0

    @property
    def overhead(self) -> int:
        return (self.active << 8) + self.inactive


class IpvsSelector:
    """One IPVS virtual server with kube-proxy's graceful termination; scheduler by name."""

    def __init__(self, scheduler: str) -> None:
        if scheduler not in {"rr", "lc", "wlc", "sh", "mh"}:
            raise ValueError(f"unknown IPVS scheduler {scheduler!r}")
        self.scheduler = scheduler
        self._least = scheduler in ("lc", "wlc")
        self.dests: dict[int, Destination] = {}
        self._next_seq = 0
        self._time_wait: deque[tuple[float, int, int]] = deque()  # (expires, endpoint, seq)
        self._next_graceful_check = IPVS_GRACEFUL_CHECK_SECONDS
        # rr: seqs of weight>0 destinations (ascending) and the cursor (seq of the last pick).
        self._rr_seqs: list[int] = []
        self._rr_by_seq: dict[int, int] = {}
        self._rr_cursor: int | None = None
        # lc: heap of (overhead, -seq, endpoint, version); stale entries are skipped lazily.
        self._heap: list[tuple[int, int, int, int]] = []
        # sh / mh: lookup tables, rebuilt on any change.
        self._table: list[int] = []
        self._dirty = True

    # -- list maintenance ------------------------------------------------------------------------

    def list_order(self) -> list[int]:
        """Endpoints in IPVS list order (head first), for tests and inspection."""
        return [d.endpoint for d in sorted(self.dests.values(), key=lambda d: -d.seq)]

    def _add(self, endpoint: int) -> None:
        dest = Destination(endpoint, self._next_seq)
        self._next_seq += 1
        self.dests[endpoint] = dest
        self._rr_seqs.append(dest.seq)  # the largest seq: appending keeps the list sorted
        self._rr_by_seq[dest.seq] = endpoint
        self._push(dest)
        self._dirty = True

    def _unlist_rr(self, dest: Destination) -> None:
        index = bisect_left(self._rr_seqs, dest.seq)
        if index < len(self._rr_seqs) and self._rr_seqs[index] == dest.seq:
            del self._rr_seqs[index]
            del self._rr_by_seq[dest.seq]

    def _delete(self, dest: Destination) -> None:
        # rr_del_dest: the cursor keeps its seq; the next pick is the removed entry's successor.
        self._unlist_rr(dest)
        del self.dests[dest.endpoint]
        dest.version += 1
        self._dirty = True

    def _push(self, dest: Destination) -> None:
        if self._least and dest.weight > 0:
            dest.version += 1
            heap = self._heap
            heapq.heappush(
                heap, ((dest.active << 8) + dest.inactive, -dest.seq, dest.endpoint, dest.version)
            )
            if len(heap) > 4 * len(self.dests) + 64:
                self._compact_heap()

    def _compact_heap(self) -> None:
        self._heap = [
            (d.overhead, -d.seq, d.endpoint, d.version)
            for d in self.dests.values()
            if d.weight > 0
        ]
        heapq.heapify(self._heap)

    def sync(self, serving: Sequence[int], now: float) -> None:
        self._expire(now)
        wanted = set(serving)
        for endpoint in list(self.dests):
            dest = self.dests[endpoint]
            if endpoint not in wanted and dest.weight > 0:
                if dest.active + dest.inactive == 0:
                    self._delete(dest)
                else:  # graceful termination: quiesce, delete once drained
                    dest.weight = 0
                    dest.version += 1
                    self._unlist_rr(dest)
                    self._dirty = True
            elif endpoint in wanted and dest.weight == 0:
                # MoveRSOutofGracefulDeleteList: delete, then add again below.
                self._delete(dest)
        for endpoint in serving:
            if endpoint not in self.dests:
                self._add(endpoint)
        self.tick(now)

    def tick(self, now: float) -> None:
        """kube-proxy's graceful-termination loop, every 60 s."""
        if now < self._next_graceful_check:
            return
        self._expire(now)
        while self._next_graceful_check <= now:
            self._next_graceful_check += IPVS_GRACEFUL_CHECK_SECONDS
        for dest in list(self.dests.values()):
            if dest.weight == 0 and dest.active + dest.inactive == 0:
                self._delete(dest)

    # -- connection accounting -------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        time_wait = self._time_wait
        while time_wait and time_wait[0][0] <= now:
            _, endpoint, seq = time_wait.popleft()
            dest = self.dests.get(endpoint)
            if dest is not None and dest.seq == seq:
                dest.inactive -= 1
                self._push(dest)

    def opened(self, endpoint: int, now: float) -> None:
        dest = self.dests.get(endpoint)
        if dest is None:
            return
        dest.active += 1
        heap = self._heap
        if heap and heap[0][2] == endpoint and heap[0][3] == dest.version:
            # The usual lc case: the least-loaded destination was just picked; re-key it in place.
            dest.version += 1
            heapq.heapreplace(heap, (dest.overhead, -dest.seq, endpoint, dest.version))
        else:
            self._push(dest)

    def closed(self, endpoint: int, now: float) -> None:
        dest = self.dests.get(endpoint)
        if dest is not None:
            dest.active -= 1
            dest.inactive += 1
            self._time_wait.append((now + IPVS_TIME_WAIT_SECONDS, endpoint, dest.seq))
            self._push(dest)

    # -- scheduling ------------------------------------------------------------------------------

    def pick(self, client_ip: int, client_port: int, now: float) -> int | None:
        if self.scheduler == "rr":
            return self._pick_rr()
        if self._least:
            if self._time_wait and self._time_wait[0][0] <= now:
                self._expire(now)
            return self._pick_lc()
        if self._dirty:
            self._rebuild_table()
        if not self._table:
            return None
        if self.scheduler == "sh":
            endpoint = self._table[sh_bucket(client_ip)]
        else:
            endpoint = self._table[mh_slot(client_ip, client_port)]
        return endpoint if self.dests[endpoint].weight > 0 else None

    def _pick_rr(self) -> int | None:
        seqs = self._rr_seqs
        if not seqs:
            return None
        # The successor in list order is the largest seq below the cursor; wrap to the head.
        index = len(seqs) if self._rr_cursor is None else bisect_left(seqs, self._rr_cursor)
        seq = seqs[index - 1] if index > 0 else seqs[-1]
        self._rr_cursor = seq
        return self._rr_by_seq[seq]

    def _pick_lc(self) -> int | None:
        heap, dests = self._heap, self.dests
        while heap:
            _, _, endpoint, version = heap[0]
            dest = dests.get(endpoint)
            if dest is not None and dest.version == version and dest.weight > 0:
                return endpoint
            heapq.heappop(heap)
        return None

    def _rebuild_table(self) -> None:
        ordered = sorted(self.dests.values(), key=lambda d: -d.seq)
        if self.scheduler == "sh":
            self._table = (
                [ordered[i % len(ordered)].endpoint for i in range(SH_BUCKETS)] if ordered else []
            )
        else:
            self._table = maglev_table([d.endpoint for d in ordered if d.weight > 0])
        self._dirty = False


def sh_bucket(client_ip: int, port: int = 0) -> int:
    """ip_vs_sh_hashkey: hash_32(port + addr, 8), the top 8 bits of a golden-ratio product."""
    return (((port + client_ip) * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> 24


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def mh_slot(client_ip: int, client_port: int) -> int:
    return _digest(f"{client_ip}:{client_port}") % MH_TABLE_SIZE


def maglev_table(endpoints: Sequence[int]) -> list[int]:
    """ip_vs_mh_populate: destinations take turns claiming their next preferred free slot."""
    if not endpoints:
        return []
    size = MH_TABLE_SIZE
    offsets = [_digest(f"offset:{e}") % size for e in endpoints]
    skips = [_digest(f"skip:{e}") % (size - 1) + 1 for e in endpoints]
    nexts = [0] * len(endpoints)
    table = [-1] * size
    filled = 0
    while True:
        for i, endpoint in enumerate(endpoints):
            slot = (offsets[i] + nexts[i] * skips[i]) % size
            while table[slot] >= 0:
                nexts[i] += 1
                slot = (offsets[i] + nexts[i] * skips[i]) % size
            table[slot] = endpoint
            nexts[i] += 1
            filled += 1
            if filled == size:
                return table


def make_selector(mode: str, rng: random.Random) -> Selector:
    if mode in ("iptables", "nftables"):
        return RandomSelector(rng)
    if mode.startswith("ipvs-"):
        return IpvsSelector(scheduler_of(mode))
    raise ValueError(f"unknown mode {mode!r}")
