"""Real (non-mocked) network fixtures for tombstone-sidecar tests.

Everything here listens on loopback only, so tests exercise actual sockets,
DNS packets and TLS handshakes without touching the outside network.
"""

from tests.support.dns_server import DnsServer, QueryRecord, Zone
from tests.support.procs import (
    ManagedProcess,
    ProcessStartError,
    free_port,
    port_open,
    terminate_process_group,
    wait_for_port,
    wait_until,
)
from tests.support.tls_upstream import (
    Blackhole,
    RefusingPort,
    Request,
    Response,
    TestCA,
    Upstream,
)

__all__ = [
    "Blackhole",
    "DnsServer",
    "ManagedProcess",
    "ProcessStartError",
    "QueryRecord",
    "RefusingPort",
    "Request",
    "Response",
    "TestCA",
    "Upstream",
    "Zone",
    "free_port",
    "port_open",
    "terminate_process_group",
    "wait_for_port",
    "wait_until",
]
