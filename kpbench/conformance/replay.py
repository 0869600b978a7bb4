"""Replay a kernel's conformance trace through the IPVS model and count disagreements. Pure code.

The model (`kpbench.dataplane.IpvsSelector`) is given exactly what the kernel was given, at the
guest's times: each sync's ready endpoints in the same order, each graceful pass, each
connection's client address and port, each close or reset. It is compared with the kernel on

* every decision: the real server the kernel chose, or that it refused the connection;
* after every operation: the list of real servers in list order, each with its weight and its
  active and inactive connection counts (one check per real server and field, one for order).

After a decision the model follows the kernel's choice (its counters count the connection where
the kernel put it), so that one disagreement is not counted again in every later step. A step
is left uncompared when a connection's expiry deadline in the model falls from
`LATE_SLACK_SECONDS` before it to `EARLY_SLACK_SECONDS` after it: the kernel's timer wheel
(`kernel/time/timer.c`) fires a timer never early but up to one granule late, and at HZ=250 a
120 s timeout sits on the level whose granule is 512 jiffies (2.05 s).
A scenario in which the kernel dropped a returning server's connections
(expire_nodest_conn's deferred work, won by the re-add on real hardware) is compared up to that
step only.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

from kpbench.conformance.scenarios import SERVER_PORT
from kpbench.dataplane import (
    IPVS_CLOSE_SECONDS,
    IPVS_TIME_WAIT_SECONDS,
    IpvsSelector,
)

EARLY_SLACK_SECONDS = 0.5
LATE_SLACK_SECONDS = 2.5


def _address(text: str) -> tuple[int, int]:
    host, port = text.rsplit(":", 1)
    return int(ipaddress.IPv4Address(host)), int(port)


@dataclass
class ScenarioResult:
    scenario: str
    scheduler: str
    decisions: int = 0
    decision_mismatches: int = 0
    refused: int = 0
    counter_checks: int = 0
    counter_mismatches: int = 0
    skipped_steps: int = 0
    dropped_at: int | None = None
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


def replay(spec: dict[str, Any], trace: dict[str, Any]) -> ScenarioResult:
    """Compare one scenario of a trace with the model."""
    result = ScenarioResult(spec["id"], spec["scheduler"])
    servers = [f"{a}:{SERVER_PORT}" for a in spec["servers"]]
    index = {address: i for i, address in enumerate(servers)}
    model = IpvsSelector(spec["scheduler"], address_of=lambda i: _address(servers[i]),
                         graceful_check_seconds=math.inf)
    held: dict[str, int] = {}
    deadlines: list[float] = []
    for step, event in enumerate(trace["events"]):
        t = event["t"]
        skip = any(t - LATE_SLACK_SECONDS <= d <= event["t_read"] + EARLY_SLACK_SECONDS
                   for d in deadlines)
        op = event["op"]
        if op == "sync":
            model.sync(event["ready"], t)
        elif op == "graceful":
            model.graceful_pass(t)
        elif op == "connect":
            client_ip, client_port = _address(event["client"])
            chosen = model.pick(client_ip, client_port, t)
            kernel = index[event["dest"]] if event["dest"] is not None else None
            if not skip:
                result.decisions += 1
                result.refused += kernel is None
                if chosen != kernel:
                    result.decision_mismatches += 1
                    result.note(f"step {step} {event['client']}: kernel "
                                f"{_name(servers, kernel)}, model {_name(servers, chosen)}")
            if kernel is not None:
                model.opened(kernel, t)
                held[event["client"]] = kernel
        elif op == "close":
            model.closed(held.pop(event["client"]), t, reset=event["reset"])
            deadlines.append(t + (IPVS_CLOSE_SECONDS if event["reset"] else
                                  IPVS_TIME_WAIT_SECONDS))
        if event.get("dropped"):
            result.dropped_at = step
            break
        if skip:
            result.skipped_steps += 1
        else:
            _compare_table(result, step, model, servers, event["table"], event["t_read"])
    return result


def _name(servers: list[str], endpoint: int | None) -> str:
    return "refused" if endpoint is None else servers[endpoint]


def _compare_table(result: ScenarioResult, step: int, model: IpvsSelector, servers: list[str],
                   table: list[list[Any]], t_read: float) -> None:
    model.expire(t_read)
    expected = [[servers[d.endpoint], d.weight, d.active, d.inactive]
                for d in sorted(model.dests.values(), key=lambda d: -d.seq)]
    kernel_rows = {row[0]: row for row in table}
    model_rows = {row[0]: row for row in expected}
    result.counter_checks += 1  # list order
    if [row[0] for row in table] != [row[0] for row in expected]:
        result.counter_mismatches += 1
        result.note(f"step {step}: list kernel {[r[0] for r in table]} "
                    f"model {[r[0] for r in expected]}")
    for address in kernel_rows.keys() | model_rows.keys():
        k, m = kernel_rows.get(address), model_rows.get(address)
        for column, name in ((1, "weight"), (2, "active"), (3, "inactive")):
            result.counter_checks += 1
            if k is None or m is None or k[column] != m[column]:
                result.counter_mismatches += 1
                result.note(f"step {step} {address} {name}: kernel "
                            f"{k[column] if k else 'absent'}, model {m[column] if m else 'absent'}")


def summarise(results: list[ScenarioResult]) -> dict[str, dict[str, int]]:
    """Per scheduler: scenarios, decisions, refused, decision and counter mismatches."""
    table: dict[str, dict[str, int]] = {}
    for r in results:
        row = table.setdefault(r.scheduler, dict.fromkeys(
            ("scenarios", "decisions", "refused", "decision_mismatches", "counter_checks",
             "counter_mismatches", "skipped_steps", "dropped"), 0))
        row["scenarios"] += 1
        row["decisions"] += r.decisions
        row["refused"] += r.refused
        row["decision_mismatches"] += r.decision_mismatches
        row["counter_checks"] += r.counter_checks
        row["counter_mismatches"] += r.counter_mismatches
        row["skipped_steps"] += r.skipped_steps
        row["dropped"] += r.dropped_at is not None
    return table
