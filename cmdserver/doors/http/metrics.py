"""``/metrics`` (Prometheus) and ``/healthz``.

The metrics are read from the daemon's counters when Prometheus scrapes
(:class:`CoreCollector`, a custom ``prometheus_client`` collector): nothing is
counted for them on the way of a command beyond what the core keeps anyway
(:class:`cmdserver.stats.Stats`).  Labels are commands, doors, outcomes and
file operations: never a user name or an address.  prometheus_client's
``ProcessCollector`` and ``PlatformCollector`` add the process's CPU, memory,
open files and start time and the Python version.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from cmdserver.doors.http.door import HTTPDoor, encode, prepare
from cmdserver.doors.http.errors import UNAVAILABLE
from cmdserver.doors.http.login import Login
from cmdserver.stats import DURATION_BUCKETS

_BOUNDS = [f"{b:g}" for b in DURATION_BUCKETS] + ["+Inf"]


class CoreCollector(Collector):
    """The daemon's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, door: HTTPDoor) -> None:
        self.door = door

    def collect(self) -> Iterator[Metric]:
        core = self.door.core
        stats = core.stats
        service = self.door.service
        commands = CounterMetricFamily(
            "cmdserver_commands", "Commands that ended, by command, door and outcome "
            "(ok, error, refused, cancelled, deadline, output-limit, internal-error).",
            labels=["command", "door", "outcome"])
        for (command, door, outcome), n in sorted(stats.outcomes().items()):
            commands.add_metric([command, door, outcome], n)
        yield commands

        durations = HistogramMetricFamily(
            "cmdserver_command_duration_seconds", "How long commands ran, by command and door.",
            labels=["command", "door"])
        for door, by_command in sorted(stats.durations.items()):
            for command, times in sorted(by_command.items()):
                total, buckets = 0.0, []
                for bound, count in zip(_BOUNDS, times[:-1], strict=True):
                    total += count
                    buckets.append((bound, total))
                durations.add_metric([command, door], buckets, sum_value=times[-1])
        yield durations

        yield GaugeMetricFamily("cmdserver_commands_in_flight", "Commands running now.",
                                value=stats.in_flight)
        yield CounterMetricFamily("cmdserver_commands_not_found",
                                  "Command names no door serves (typos, probes).",
                                  value=stats.not_found)

        doors = sorted({d.door for d in getattr(service, "doors", ())} | set(stats.connections))
        open_now = GaugeMetricFamily("cmdserver_connections_open", "Open connections, by door.",
                                     labels=["door"])
        for door in doors:
            open_now.add_metric([door], stats.connections.get(door, 0))
        yield open_now
        yield CounterMetricFamily("cmdserver_connections", "Connections accepted, all doors.",
                                  value=stats.connections_total)
        yield CounterMetricFamily("cmdserver_connections_refused",
                                  "Connections refused by --max-clients or --max-per-ip.",
                                  value=stats.refused)
        listening = GaugeMetricFamily("cmdserver_door_endpoints_listening",
                                      "Endpoints listening, by door.", labels=["door"])
        configured = GaugeMetricFamily("cmdserver_door_endpoints",
                                       "Endpoints configured, by door.", labels=["door"])
        for door in sorted({d.door for d in getattr(service, "doors", ())}):
            services = [d for d in service.doors if d.door == door]
            listening.add_metric([door], sum(d.port is not None for d in services))
            configured.add_metric([door], len(services))
        yield listening
        yield configured

        yield CounterMetricFamily("cmdserver_logins", "Successful logins, every door.",
                                  value=stats.logins)
        yield CounterMetricFamily("cmdserver_login_failures", "Failed logins, every door.",
                                  value=stats.login_failures)
        operations = CounterMetricFamily("cmdserver_file_operations",
                                         "File operations (SFTP, HTTP downloads), by name.",
                                         labels=["operation"])
        for name, n in sorted(stats.file_operations.items()):
            operations.add_metric([name], n)
        yield operations

        uploads = self.door.uploads
        if uploads is not None:
            yield CounterMetricFamily("cmdserver_upload_files",
                                      "Uploads published (HMAC matched), every door but SFTP.",
                                      value=uploads.files)
            yield CounterMetricFamily("cmdserver_upload_bytes",
                                      "Bytes of the uploads published.", value=uploads.bytes)
            yield GaugeMetricFamily("cmdserver_uploads_in_flight", "Uploads under way.",
                                    value=len(uploads.active))
        scan = core.policy.scan
        yield CounterMetricFamily("cmdserver_portscan_ports_probed",
                                  "Ports portscan has tried, all scans.",
                                  value=scan.budget.probed)
        yield GaugeMetricFamily("cmdserver_portscan_connects_in_flight",
                                "Port scan connects waiting for an answer.",
                                value=scan.budget.in_flight)
        audit = getattr(service, "audit", None)
        if audit is not None:
            yield CounterMetricFamily("cmdserver_audit_write_errors",
                                      "Batches of audit records that could not be written.",
                                      value=audit.write_errors)
            yield CounterMetricFamily("cmdserver_audit_records_lost",
                                      "Audit records lost to write errors.",
                                      value=audit.lines_lost)
        yield GaugeMetricFamily("cmdserver_sessions_open", "Sessions open in the core.",
                                value=len(core.sessions))


def metrics_registry(door: HTTPDoor) -> CollectorRegistry:
    """The door's own registry (never prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(CoreCollector(door))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class Monitoring:
    """``/metrics`` and ``/healthz``."""

    def __init__(self, door: HTTPDoor) -> None:
        self.door = door

    def metrics(self, request: Any, login: Login | None) -> bytes:
        accept = request.requestHeaders.getRawHeaders(b"accept")
        encoder, content_type = choose_encoder(accept[0].decode("latin-1") if accept else "")
        body: bytes = encoder(self.door.metrics)
        prepare(request, 200, content_type.encode())
        return body

    def healthz(self, request: Any) -> bytes:
        """200 while every configured endpoint of every door listens, else 503."""
        doors = getattr(self.door.service, "doors", ())
        down = sorted({d.door for d in doors if d.port is None})
        status = UNAVAILABLE if down else 200
        prepare(request, status)
        value: dict[str, Any] = {"status": "ok" if not down else "unavailable",
                                 "doors": {d.door: d.door not in down for d in doors}}
        if down:
            value["down"] = down
        return encode(value)
