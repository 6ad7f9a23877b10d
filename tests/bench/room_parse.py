"""How long reading a send_join answer holds the event loop: `python -m tests.bench.room_parse`.

Builds a full-state v2 answer for `--members` servers (one member event each, with hashes
and a signature the size of real ones, and `servers_in_room`), then times, in this
process, one `json.loads` of it (what a naive reader would hold the loop for) against
`RoomServers` (sidecar/judge/room_servers.py), which yields every EVENTS_PER_SLICE events:
its total time and its longest slice, the longest the event loop waits. Prints JSON;
the medians of `--rounds` runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
from typing import Any

from sidecar.judge.room_servers import EVENTS_PER_SLICE, RoomServers, decoded


def member(index: int) -> dict[str, Any]:
    """One m.room.member event as a resident server sends it (sizes of real ones)."""
    server = f"s{index}.fed.test"
    return {
        "type": "m.room.member",
        "state_key": f"@u{index}:{server}",
        "sender": f"@u{index}:{server}",
        "room_id": "!room:hub.fed.test",
        "content": {"membership": "join", "displayname": f"User {index}"},
        "origin_server_ts": 1_700_000_000_000 + index,
        "depth": index,
        "prev_events": [f"$prev{index}"],
        "auth_events": ["$create", "$power", "$join_rules"],
        "hashes": {"sha256": base64.b64encode(os.urandom(32)).decode()},
        "signatures": {server: {"ed25519:a": base64.b64encode(os.urandom(64)).decode()}},
    }


def answer(members: int) -> bytes:
    state = [member(i) for i in range(members)]
    return json.dumps(
        {
            "origin": "hub.fed.test",
            "state": state,
            "auth_chain": state[:100],
            "event": state[0],
            "members_omitted": False,
            "servers_in_room": [f"s{i}.fed.test" for i in range(members)],
        }
    ).encode()


def once(body: bytes) -> dict[str, float]:
    began = time.perf_counter()
    json.loads(body)
    whole = time.perf_counter() - began
    text = decoded(body, "")
    servers = RoomServers(text)
    longest, began = 0.0, time.perf_counter()
    mark = began
    for _ in servers.slices():
        now = time.perf_counter()
        longest, mark = max(longest, now - mark), now
    end = time.perf_counter()
    longest = max(longest, end - mark)
    return {
        "json_loads_ms": whole * 1000,
        "incremental_total_ms": (end - began) * 1000,
        "incremental_longest_slice_ms": longest * 1000,
        "names": len(servers.names),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.room_parse")
    parser.add_argument("--members", type=int, default=10_000, help="servers in the room")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    body = answer(args.members)
    runs = [once(body) for _ in range(args.rounds)]
    result: dict[str, float] = {
        "members": args.members,
        "body_mb": round(len(body) / 1e6, 2),
        "events_per_slice": EVENTS_PER_SLICE,
    }
    for key in runs[0]:
        result[key] = round(statistics.median(run[key] for run in runs), 2)
    result["incremental_longest_slice_ms_max"] = round(
        max(run["incremental_longest_slice_ms"] for run in runs), 2
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
