"""`tombstone-sidecar`: run the proxy, or check one server name's tombstone signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NoReturn

from sidecar import __version__
from sidecar.cli import kit as kit_cli
from sidecar.cli import verdicts as verdicts_cli
from sidecar.config.options import (
    BY_NAME,
    OPTIONS,
    ConfigError,
    Option,
    Settings,
    gather_raw,
    open_proxy_problem,
)
from sidecar.proxy.shared_port import mode_spec

log = logging.getLogger("sidecar")

EXIT_ALIVE, EXIT_GONE, EXIT_USAGE, EXIT_LOOKUP_FAILED = 0, 1, 2, 3
STREAM_BODIES_OVER = "1m"  # intercept mode: larger bodies stream through, never buffered

DESCRIPTION = """\
An egress proxy for a Matrix homeserver. Point the homeserver's HTTPS_PROXY at it; it
answers connections to decommissioned ("tombstoned") servers locally, so they receive
nothing and the homeserver gets a fast answer, and passes everything else through.
"""

RUN_EPILOG = """\
signals (any one marks a server gone):
  dns_txt_gone  TXT "v=matrix;gone" at the server name
  dns_srv_dot   _matrix-fed._tcp (or _matrix._tcp) SRV whose only target is "."
  invalid_tld   the name, or every SRV target of it, is under .invalid
  nxdomain      the name does not exist (NXDOMAIN; not SERVFAIL, not a timeout)
  operator      listed with --deny / --deny-file
  http_410      the server answers 410 Gone on /.well-known/matrix/ or /_matrix/ (learned
                by probes in pass-through, from its responses in intercept mode)
A resolver timeout or SERVFAIL is never a tombstone: the connection passes (fail open).

every option can also come from the environment (TOMBSTONE_MIN_TTL=10m, lists comma-
separated) or a YAML file (--config); precedence is flag > env > file > default.

examples:
  tombstone-sidecar run
  HTTPS_PROXY=http://127.0.0.1:3128 python -m synapse.app.homeserver -c homeserver.yaml
  tombstone-sidecar run --deny old.example.org --no-enforce     # shadow mode first
  curl -s http://127.0.0.1:9480/metrics | grep tombstone_suppressed_total
"""

CHECK_EPILOG = """\
exit status: 0 alive, 1 gone, 2 usage error, 3 DNS could not answer (no verdict).

--probe adds the HTTP side, fetched as a remote homeserver would: the well-known (410 is a
tombstone, m.server delegates), SRV, then /_matrix/federation/v1/version on the target;
each 410 is judged with the sidecar's own rule and lifetime (--gone-ttl, --min-gone-ttl,
--max-gone-ttl), certificates verified (system store plus --upstream-ca), only to
addresses --allow-address permits.

examples:
  tombstone-sidecar check example.org
  tombstone-sidecar check example.org --nameserver 1.1.1.1 --json
  tombstone-sidecar check example.org --probe      # after publishing your own tombstone
"""


VERDICTS_EPILOG = """\
examples:
  tombstone-sidecar verdicts list --state gone
  tombstone-sidecar verdicts show old.example.org
  tombstone-sidecar verdicts deny old.example.org --ttl 30d --comment "shut down 2026-11"
  tombstone-sidecar verdicts forget old.example.org      # check it again now
"""
VERDICTS_OPTIONS = (
    "config",
    "ops_listen",
    "ops_token_file",
    "synapse_admin_url",
    "synapse_admin_token_file",
)  # the last two for `list --synapse`


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem, and where help is; exit status 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help text


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    env = f"env {option.env}"
    if option.flag:
        default = "on" if option.default else "off"
        parser.add_argument(
            option.cli,
            dest=option.name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=_escape(f"{option.help} (default: {default}; {env})"),
        )
        return
    shown = ", ".join(option.default) if option.repeatable else option.default
    default = f"default: {shown}; " if shown else ""
    parser.add_argument(
        option.cli,
        dest=option.name,
        metavar=option.metavar,
        default=None,
        action="append" if option.repeatable else "store",
        help=_escape(f"{option.help} ({default}{env})"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tombstone-sidecar",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    run = commands.add_parser(
        "run",
        help="run the proxy (pass-through by default, or --mode intercept)",
        description=DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check = commands.add_parser(
        "check",
        help="show every tombstone signal for one server name",
        description="Run every DNS tombstone signal for one server name "
        "live and print the evidence and the verdict.",
        epilog=CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "name", metavar="NAME", help="server name, e.g. example.org or example.org:8448"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--probe", action="store_true",
                       help="also fetch the well-known and federation version over HTTPS and "
                            "judge any 410 Gone (see below)")  # fmt: skip
    for option in OPTIONS:
        _add_option(run, option)
        if option.scope != "run" and option.name != "probe":  # check has its own --probe
            _add_option(check, option)
    verdicts = commands.add_parser(
        "verdicts",
        help="list, show, forget or mark verdicts of a running sidecar",
        description="Talk to a running sidecar's ops API (--ops-listen). Changes (forget, "
        "deny) need the token from --ops-token-file.",
        epilog=VERDICTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def add_verdicts_options(action: argparse.ArgumentParser) -> None:
        for name in VERDICTS_OPTIONS:
            _add_option(action, BY_NAME[name])

    verdicts_cli.add_commands(verdicts, add_verdicts_options)
    ca_parser = commands.add_parser(
        "ca",
        help="create (once) and export the intercept-mode CA",
        description="The CA intercept mode signs its certificates with lives in "
        "<state-dir>/ca and is made on first use. Export it for the homeserver: "
        "federation_custom_ca_list (it replaces the system store for federation, so give it "
        "the --bundle) or SSL_CERT_FILE.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ca_parser.add_argument("--export", metavar="FILE", help="write the CA certificate (PEM)")
    ca_parser.add_argument("--bundle", metavar="FILE", help="write system CAs + ours (PEM)")
    for name in ("config", "state_dir"):
        _add_option(ca_parser, BY_NAME[name])
    ca_parser.set_defaults(func=_cmd_ca)
    kit_cli.add_command(commands).set_defaults(func=lambda args, settings, raw: kit_cli.run(args))
    run.set_defaults(func=_cmd_run)
    check.set_defaults(func=_cmd_check)
    verdicts.set_defaults(func=_cmd_verdicts)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    try:
        raw = gather_raw(flags)
        settings = Settings.from_raw(raw)
    except ConfigError as e:
        print(f"tombstone-sidecar: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    result: int = args.func(args, settings, raw)
    return result


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # mitmproxy logs per connection at INFO: not for operators
    log.setLevel(level.upper())


def _cmd_run(args: argparse.Namespace, settings: Settings, raw: dict[str, Any]) -> int:
    problem = open_proxy_problem(settings.listen.host, settings)
    if problem is not None:
        print(f"tombstone-sidecar: error: --listen: {problem}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(settings.log_level)
    _raise_open_file_limit()
    return asyncio.run(_serve(settings))


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


async def _serve(settings: Settings) -> int:
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
                print(f"tombstone-sidecar: error: --state-dir: cannot keep the CA: {e}",
                      file=sys.stderr)  # fmt: skip
                return EXIT_USAGE
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
            master.addons.add(*_mitmproxy_addons(), Admission(addon.metrics, settings), addon)
            # Options defined by addons exist only once the addons are loaded.
            opts.update(
                mode=[mode_spec(settings.listen.port, settings.reuse_port)],
                listen_host=settings.listen.host,
                connection_strategy="lazy",
                **mitm,
            )
        except OptionsError as e:
            print(f"tombstone-sidecar: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        loop = asyncio.get_running_loop()
        drain = _Drain(master, opts, addon, settings.shutdown_grace)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, drain.begin, sig)
        await master.run()
        _quiet_cancelled_connections(loop)  # the connections still open are cancelled next
    if addon.fatal:
        print(f"tombstone-sidecar: error: {addon.fatal}", file=sys.stderr)
        return 1
    return 0


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
        log.info("%s: no new connections; waiting up to %gs for %d open connection(s)",
                 sig.name, self.grace, open_now)  # fmt: skip
        if self.addon.active_clients > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.addon.idle.wait(), self.grace)
        if self.addon.active_clients > 0:
            log.warning("closing %d connection(s) still open after %gs",
                        self.addon.active_clients, self.grace)  # fmt: skip
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


def _cmd_ca(args: argparse.Namespace, settings: Settings, raw: dict[str, Any]) -> int:
    from pathlib import Path

    from sidecar.proxy import ca

    try:
        cert = ca.ensure_ca(settings.state_dir)
        if args.export:
            ca.export(cert, Path(args.export))
        if args.bundle:
            ca.write_bundle(cert, Path(args.bundle))
    except OSError as e:
        print(f"tombstone-sidecar: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"CA {cert}: {ca.describe(cert)}")
    for what, path in (("certificate", args.export), ("bundle", args.bundle)):
        if path:
            print(f"wrote the {what} to {path}")
    return 0


def _cmd_verdicts(args: argparse.Namespace, settings: Settings, raw: dict[str, Any]) -> int:
    return verdicts_cli.run(args, settings)


def _cmd_check(args: argparse.Namespace, settings: Settings, raw: dict[str, Any]) -> int:
    from sidecar.cli.check import run_check

    return asyncio.run(run_check(args.name, settings, as_json=args.json, probe=args.probe))


if __name__ == "__main__":
    sys.exit(main())
