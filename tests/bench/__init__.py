"""Benchmarks for tombstone-sidecar, run on demand: `python -m tests.bench` (not under pytest).

Every scenario measures the sidecar and its baseline (a bare mitmdump, or no proxy at all)
in the same run, alternating over several rounds, and prints medians and ratios as a
Markdown table together with the machine, the versions, the date and the exact command.

Layout:
- `__main__.py`: the command line (`--rounds`, `--seconds`, `--quick`, `--only`, ...).
- `harness.py`: the orchestrator: real DNS server and TLS upstream (tests/support), proxy
  subprocesses pinned to one core, load generators pinned to the other, the rounds.
- `load.py`: the load generator, a separate process (`python -m tests.bench.load`):
  asyncio raw sockets for CONNECT floods, new TLS tunnels, pooled tunnels, cold names.
- `inproc.py`: in-process measurements in a fresh process (`python -m tests.bench.inproc`):
  cached decision time, the addon's `http_connect` path, cold decisions, RSS per verdict.
- `connect_502.py`: the baseline's only addon (`mitmdump -s`): every CONNECT gets a 502.
- `squid.py`: the connect scenario's anchor, squid with a `dstdomain` deny list
  (`apt-get install squid`; left out, with a note, where it is not installed).
- `report.py`: machine info and the Markdown table.

`--py-spy DIR` adds one uncounted, profiled run per proxy (py-spy raw stacks in DIR) and
notes how much of the proxy's CPU is the addon's own code vs mitmproxy's hook dispatch.
Every timed run also records the CPU used by processes outside the benchmark: on a shared
machine the header says how much interference there was.
"""
