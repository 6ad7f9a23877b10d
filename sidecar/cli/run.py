"""`tombstone-sidecar run`: the proxy itself, inside mitmproxy, until SIGTERM.

Everything about running lives here: the mitmproxy master with only the addons pass-through
needs, the mapping of the sidecar's options onto mitmproxy's, the open-file limit, and the
graceful drain on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import signal
import sys
import tempfile
from typing import Any

from sidecar.cli import exits
from sidecar.cli.args import add_options, fail, sources_note
from sidecar.config.options import RawOptions, Settings, open_proxy_problem
from sidecar.proxy.shared_port import mode_spec

log = logging.getLogger("sidecar")

NAME = "run"
STREAM_BODIES_OVER = "1m"  # intercept mode: larger bodies stream through, never buffered
SOURCES = sources_note(
    "TOMBSTONE_MIN_TTL=10m TOMBSTONE_DENY=a.example,b.example tombstone-sidecar run"
)

DESCRIPTION = """\
An egress proxy for a Matrix homeserver. Point the homeserver's HTTPS_PROXY at it; it
answers connections to decommissioned ("tombstoned") servers locally, so they receive
nothing and the homeserver gets a fast answer, and passes everything else through.
"""

EPILOG = f"""\
signals (any one marks a server gone):
  dns_txt_gone  TXT "v=matrix;gone" at the server name
  dns_srv_dot   _matrix-fed._tcp (or _matrix._tcp) SRV whose only target is "."
  invalid_tld   the name, or every SRV target of it, is under .invalid
  nxdomain      the name does not exist (NXDOMAIN; not SERVFAIL, not a timeout)
  operator      listed with --deny / --deny-file
  http_410      the server answers 410 Gone on /.well-known/matrix/ or /_matrix/ (learned
                by probes in pass-through, from its responses in intercept mode)
A resolver timeout or SERVFAIL is never a tombstone: the connection passes (fail open).

{SOURCES}
examples:
  tombstone-sidecar run
  HTTPS_PROXY=http://127.0.0.1:3128 python -m synapse.app.homeserver -c homeserver.yaml
  tombstone-sidecar run --deny old.example.org --no-enforce     # shadow mode first
  curl -s http://127.0.0.1:9480/metrics | grep tombstone_suppressed_total
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="run the proxy (pass-through by default, or --mode intercept)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, NAME)
    return parser


def main(args: argparse.Namespace, settings: Settings, raw: RawOptions) -> int:
    problem = open_proxy_problem(settings.listen.host, settings)
    if problem is not None:
        return fail(f"{raw.label('listen')}: {problem}")
    _setup_logging(settings.log_level)
    _raise_open_file_limit()
    return asyncio.run(_serve(settings, raw))


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # mitmproxy logs per connection at INFO: not for operators
    log.setLevel(level.upper())


def _raise_open_file_limit() -> None:
    """Each tunnel costs two descriptors; a soft limit of 1024 caps a busy homeserver at ~500
    tunnels. Raise the soft limit to the hard limit, as nginx and Envoy do."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("open file limit raised from %d to %d", soft, target)
    except (ValueError, OSError) as e:
        log.warning("could not raise the open file limit (%s); it caps concurrent tunnels", e)


async def _serve(settings: Settings, raw: RawOptions) -> int:
    from mitmproxy.exceptions import OptionsError
    from mitmproxy.master import Master
    from mitmproxy.options import Options

    from sidecar.proxy.addon import TombstoneAddon
    from sidecar.proxy.admission import Admission

    # Pass-through mode never intercepts, but mitmproxy insists on a CA in its confdir at
    # start: give it a private throwaway directory rather than ~/.mitmproxy. Intercept
    # mode keeps its CA in the state directory.
    with tempfile.TemporaryDirectory(prefix="tombstone-sidecar-") as scratch:
        mitm: dict[str, Any] = {}
        if settings.mode == "intercept":
            from sidecar.proxy import ca

            try:
                cert = ca.ensure_ca(settings.state_dir)
                if settings.upstream_ca:
                    mitm["ssl_verify_upstream_trusted_ca"] = ca.upstream_trust(
                        settings.state_dir, settings.upstream_ca
                    )
            except OSError as e:
                return fail(f"{raw.label('state_dir')}: cannot keep the CA: {e}")
            confdir = str(cert.parent)
            mitm["stream_large_bodies"] = STREAM_BODIES_OVER  # media must not sit in memory
            log.info("intercept mode: CA %s (%s)", cert, ca.describe(cert))
        else:
            confdir = scratch
        opts = Options(confdir=confdir)
        master = Master(opts, with_termlog=False)
        addon = TombstoneAddon(settings)  # validated once, handed over whole
        try:
            # Admission first: nothing reaches the decision hooks before it admits a client.
            admission = Admission(addon.metrics, settings, refuse_early=addon.refuse_early)
            master.addons.add(*_mitmproxy_addons(), admission, addon)
            # Options defined by addons exist only once the addons are loaded.
            opts.update(
                mode=[mode_spec(settings.listen.port, settings.reuse_port)],
                listen_host=settings.listen.host,
                connection_strategy="lazy",
                **mitm,
            )
        except OptionsError as e:
            return fail(str(e))
        loop = asyncio.get_running_loop()
        drain = _Drain(master, opts, addon, settings.shutdown_grace)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, drain.begin, sig)
        await master.run()
        _quiet_cancelled_connections(loop)  # the connections still open are cancelled next
    if addon.fatal:
        print(f"tombstone-sidecar: error: {addon.fatal}", file=sys.stderr)
        return exits.FAILED
    return exits.OK


def _mitmproxy_addons() -> list[object]:
    """Only the mitmproxy addons pass-through needs.

    Every hook is dispatched through every loaded addon; mitmdump's 34 addons cost a third
    of the proxy's CPU per connection (profiled with py-spy), and this set is measured in
    tests/bench. Core and Proxyserver run the proxy, NextLayer chooses protocol layers,
    TlsConfig parses ClientHellos (and owns the CA options), Block keeps mitmproxy's
    refusal of clients from public addresses, ErrorCheck turns startup errors into an exit.
    """
    from mitmproxy.addons import block, core, errorcheck, next_layer, proxyserver, tlsconfig

    return [
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        block.Block(),
        errorcheck.ErrorCheck(),
    ]


class _Drain:
    """Graceful shutdown (Kubernetes sends SIGTERM, then SIGKILL after its grace period).

    First signal: stop accepting connections, mark /readyz not ready, and let open
    tunnels finish for up to --shutdown-grace; then exit 0. A second signal exits at once.
    """

    def __init__(self, master: Any, opts: Any, addon: Any, grace: float) -> None:
        self.master, self.opts, self.addon, self.grace = master, opts, addon, grace
        self.task: asyncio.Task[None] | None = None

    def begin(self, sig: signal.Signals) -> None:
        if self.task is not None:
            log.warning("%s again: exiting now", sig.name)
            self.master.shutdown()
            return
        self.task = asyncio.get_running_loop().create_task(self._drain(sig))

    async def _drain(self, sig: signal.Signals) -> None:
        self.addon.draining = True
        self.opts.update(server=False)  # closes the listener; open connections carry on
        open_now = self.addon.active_clients
        log.info(
            "%s: no new connections; waiting up to %gs for %d open connection(s)",
            sig.name,
            self.grace,
            open_now,
        )
        if self.addon.active_clients > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.addon.idle.wait(), self.grace)
        if self.addon.active_clients > 0:
            log.warning(
                "closing %d connection(s) still open after %gs",
                self.addon.active_clients,
                self.grace,
            )
        self.master.shutdown()


def _quiet_cancelled_connections(loop: asyncio.AbstractEventLoop) -> None:
    """From here on, a connection task cancelled by the shutdown is not an error.

    After mitmproxy's master returns, asyncio cancels the connections still open, and its
    stream callback reports each as an "Exception in callback" ERROR with a 20-line
    traceback; the drain's WARNING already said how many connections were closed. Any
    other exception is still reported as before.
    """
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), asyncio.CancelledError):
            log.debug("closed at shutdown: %s", context.get("message"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
