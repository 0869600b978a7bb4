"""Seeded plans of kube-proxy's operations on IPVS virtual servers. Pure code.

A plan holds one scenario per (scheduler, index), each with its own virtual server (VIP), real
servers and client addresses, and four phases that every scenario goes through together:

* `open`: endpoint batches added in a random order (as kube-proxy's map iteration gives them),
  connections from many client addresses and ports, an endpoint quiesced (graceful
  termination) and one coming back while quiesced (deleted and re-added in one batch);
* `close`: some held connections closed (FIN) and some reset (RST), among them every
  connection of the endpoint that stays quiesced;
* `churn`, once the reset connections have expired (IPVS keeps a reset entry 10 s) and before
  the closed ones do (TIME_WAIT 120 s): the graceful pass, more quiescing, returning and new
  endpoints, more connections;
* `post`, once the closed connections have expired: the graceful pass again, an endpoint that
  was deleted coming back, more connections.

Operations: `sync` (the endpoints kube-proxy's next sync sees as ready, in its iteration
order), `graceful` (the graceful-termination manager's pass), `connect` (connections from
(client address index, port) pairs), `close` (a fraction of held connections, FIN or RST, the
guest chooses which with the scenario's seed; `server` closes all of that endpoint's).
"""

from __future__ import annotations

import random
from typing import Any

SCHEDULERS = ("rr", "lc", "wlc", "sh", "mh")
PHASES = ("open", "close", "churn", "post")
# Seconds after the close phase ends before `churn` starts and after which `post` starts:
# past IPVS's CLOSE timeout (10 s) and past its TIME_WAIT / FIN_WAIT timeouts (120 s).
CHURN_AFTER_CLOSE = 13.0
POST_AFTER_CLOSE = 126.0
SERVICE_PORT = 80
SERVER_PORT = 8080

Op = dict[str, Any]


def vip(index: int) -> str:
    return f"198.19.200.{index + 1}"


def server_address(scenario: int, server: int) -> str:
    return f"198.19.{1 + scenario}.{server + 1}"


def client_address(scenario: int, client: int) -> str:
    return f"198.18.{1 + scenario}.{client + 1}"


def make_plan(seed: int = 1, per_scheduler: int = 5, schedulers: tuple[str, ...] = SCHEDULERS,
              connects_per_step: int = 11) -> dict[str, Any]:
    """The whole plan: `{"seed", "scenarios": [...]}`, JSON-serialisable."""
    scenarios = []
    for s_index, scheduler in enumerate(schedulers):
        for k in range(per_scheduler):
            index = s_index * per_scheduler + k
            rng = random.Random(f"{seed}:{scheduler}:{k}")
            scenarios.append(_scenario(index, scheduler, rng, connects_per_step))
    return {"seed": seed, "scenarios": scenarios}


def _scenario(index: int, scheduler: str, rng: random.Random, per_step: int) -> dict[str, Any]:
    initial = rng.randint(3, 4)
    n_servers = initial + rng.randint(3, 5)
    n_clients = rng.choice([1, 3, 10, 40, 120])
    servers = [server_address(index, i) for i in range(n_servers)]
    clients = [client_address(index, i) for i in range(n_clients)]
    next_port = iter(range(20000, 60000))

    def connect() -> Op:
        count = rng.randint(per_step // 2, per_step + per_step // 2)
        return {"op": "connect", "clients": [[rng.randrange(n_clients), next(next_port)]
                                             for _ in range(count)]}

    ready = list(range(initial))
    rng.shuffle(ready)

    def sync() -> Op:
        order = ready.copy()
        rng.shuffle(order)  # kube-proxy iterates its endpoint set in Go map order
        return {"op": "sync", "ready": order}

    opening: list[Op] = [{"op": "sync", "ready": ready.copy()}, connect()]
    ready += [initial, initial + 1]
    opening += [sync(), connect()]
    quiesced = rng.choice(ready)
    ready.remove(quiesced)
    opening += [sync(), connect()]
    ready.append(quiesced)  # back while quiesced: deleted and re-added
    opening += [sync(), connect()]
    drained = rng.choice(ready)
    ready.remove(drained)
    opening += [sync(), connect()]

    closing: list[Op] = [
        {"op": "close", "server": drained, "reset": True},
        {"op": "close", "fraction": rng.choice([0.2, 0.4]), "reset": False},
        {"op": "close", "fraction": 0.15, "reset": True},
    ]

    churn: list[Op] = [{"op": "graceful"}, connect()]
    returning = rng.choice(ready)
    ready.remove(returning)
    churn += [sync(), connect()]
    ready.append(returning)
    ready.append(initial + 2)
    churn += [sync(), connect(), {"op": "close", "fraction": 0.1, "reset": False}]
    leaving = rng.choice(ready)
    ready.remove(leaving)
    churn += [sync(), connect(), {"op": "graceful"}]

    post: list[Op] = [{"op": "graceful"}, connect()]
    ready.append(drained)  # deleted in churn, now back
    if n_servers > initial + 3:
        ready.append(initial + 3)
    post += [sync(), connect(), {"op": "close", "server": leaving, "reset": False},
             {"op": "graceful"}, connect()]
    return {
        "id": f"{scheduler}-{index}", "scheduler": scheduler, "vip": vip(index),
        "servers": servers, "clients": clients, "guest_seed": rng.getrandbits(32),
        "phases": {"open": opening, "close": closing, "churn": churn, "post": post},
    }
