"""The ops listener against hostile bytes, through a raw socket (issue 14 defect 5).

It is unauthenticated for reads and bound to 0.0.0.0 by the manifests: a malformed
Authorization header, a HEAD, an absurd TTL or a comment with a newline must each get a
precise answer, one bounded log line at most, and the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.app import Sidecar as RunningSidecar
from sidecar.config.options import Settings
from sidecar.judge.names import parse_authority
from sidecar.ops.server import MAX_COMMENT, OpsServer
from tests.support.procs import free_port
from tests.support.sidecar_process import CRASH_MARKS, Sidecar, exchange, sidecar_command

TOKEN = "ops-api-token-0123456789abcdef"
ANSWER_WITHIN = 5.0


@pytest.fixture(scope="module")
def token_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ops-token") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def ops_sidecar(sidecar_factory: Callable[..., Sidecar], token_path: Path) -> Sidecar:
    return sidecar_factory("--ops-token-file", str(token_path), "--deny", "denied.hs.test")


def raw(sidecar: Sidecar, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; (status, headers, body) as the bytes came back."""
    received, closed, _ = exchange(sidecar.ops_port, data, half_close=True, timeout=ANSWER_WITHIN)
    assert closed and received, f"no answer to {data[:200]!r}: {received[:200]!r}"
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def put(name: str, body: bytes, authorization: bytes = b"Bearer " + TOKEN.encode()) -> bytes:
    return (
        f"PUT /v1/verdicts/{name} HTTP/1.1\r\n".encode()
        + b"Authorization: "
        + authorization
        + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def crashes(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(m in line for m in CRASH_MARKS)]


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer tökén".encode(), id="utf8-non-ascii"),
        pytest.param(b"Bearer \xff\xfe\x80", id="raw-high-bytes"),
        pytest.param(b"Bearer " + TOKEN.encode() + b"\xe9", id="right-token-plus-latin1"),
        pytest.param(b"Bearer " + TOKEN.encode()[:-1] + b"\x00", id="nul-byte"),
        pytest.param(b"Basic " + TOKEN.encode(), id="wrong-scheme"),
        pytest.param(TOKEN.encode(), id="no-scheme"),
        pytest.param("Bearer \u202e".encode(), id="bidi-override"),
    ],
)
def test_malformed_authorization_is_401_not_a_crash(
    ops_sidecar: Sidecar, authorization: bytes
) -> None:
    """The non-ASCII token made hmac.compare_digest raise TypeError: no answer and an
    18-line traceback per request. Now: 401, nothing logged, and the listener serves on."""
    before = len(ops_sidecar.log())
    for _ in range(20):
        status, headers, body = raw(ops_sidecar, put("x.hs.test", b"{}", authorization))
        assert status == 401, body
        assert headers["www-authenticate"].startswith("Bearer")
        assert "bearer token" in json.loads(body)["error"]
    log = ops_sidecar.log()[before:]
    assert not crashes(log), log[-2000:]
    assert "marked gone" not in log
    assert ops_sidecar.ops("/v1/verdicts/x.hs.test")[0] == 404  # nothing was changed
    assert ops_sidecar.ops("/healthz")[0] == 200


def test_head_answers_the_get_headers_without_a_body(ops_sidecar: Sidecar) -> None:
    for path in [
        "/healthz",
        "/readyz",
        "/v1/verdicts",
        "/v1/verdicts/denied.hs.test",
        "/v1/verdicts/unknown.hs.test",
        "/v1/verdicts/bad..name",
        "/v1/resurrections",
        "/v1/synapse",
        "/nowhere",
    ]:
        get = raw(ops_sidecar, f"GET {path} HTTP/1.1\r\n\r\n".encode())
        head = raw(ops_sidecar, f"HEAD {path} HTTP/1.1\r\n\r\n".encode())
        assert head[2] == b"", (path, head)
        assert head[0] == get[0], path
        assert head[1]["content-length"] == str(len(get[2])), path
        assert head[1]["content-type"] == get[1]["content-type"], path
    status, headers, body = raw(ops_sidecar, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, b"") and int(headers["content-length"]) > 1000
    # A name without a verdict: the 404 head, still no body.
    status, headers, body = raw(ops_sidecar, b"HEAD /v1/verdicts/x.hs.test HTTP/1.1\r\n\r\n")
    assert status == 404 and body == b"" and int(headers["content-length"]) > 0


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        ("1e300d", "longer than 3650d"),
        ("3651d", "longer than 3650d"),
        ("316000000", "longer than 3650d"),
        (1e300, "longer than 3650d"),
        ("nan", "must be a positive duration"),
        ("inf", "must be a positive duration"),
        ("-1d", "must be a positive duration"),
        ("0", "must be a positive duration"),
        ("9" * 40, "must be a duration"),
        (True, "must be a duration"),
        (None, "must be a duration"),
    ],
)
def test_put_ttl_is_bounded(ops_sidecar: Sidecar, ttl: object, error: str) -> None:
    body = json.dumps({"ttl": ttl}).encode()
    status, _, answer = raw(ops_sidecar, put("ttl.hs.test", body))
    assert status == 400, answer
    assert error in json.loads(answer)["error"]
    assert ops_sidecar.ops("/v1/verdicts/ttl.hs.test")[0] == 404


def test_put_ttl_at_the_maximum_and_in_seconds_is_taken(ops_sidecar: Sidecar) -> None:
    for name, ttl, seconds in (("max.hs.test", "3650d", 3650 * 86400), ("num.hs.test", 90, 90)):
        status, _, answer = raw(ops_sidecar, put(name, json.dumps({"ttl": ttl}).encode()))
        assert status == 200, answer
        verdict = json.loads(answer)
        assert verdict["expires_at"] - verdict["observed_at"] == seconds


@pytest.mark.parametrize(
    "comment",
    [
        "line one\nINFO sidecar.policy: forged.hs.test alive",
        "carriage\rreturn",
        "escape \x1b[31m red",
        "nul \x00",
        "separator \u2028 here",
        "bidi \u202e reversed",
        "c" * (MAX_COMMENT + 1),
    ],
)
def test_put_comment_must_be_one_bounded_line(ops_sidecar: Sidecar, comment: str) -> None:
    before = len(ops_sidecar.log())
    status, _, answer = raw(
        ops_sidecar, put("comment.hs.test", json.dumps({"comment": comment}).encode())
    )
    assert status == 400, answer
    assert "comment" in json.loads(answer)["error"]
    assert "forged" not in ops_sidecar.log()[before:]
    assert ops_sidecar.ops("/v1/verdicts/comment.hs.test")[0] == 404


def test_put_comment_lands_in_one_log_line(ops_sidecar: Sidecar) -> None:
    comment = "retired — see ticket OPS-42 «décommissionné»"
    before = len(ops_sidecar.log())
    status, _, answer = raw(
        ops_sidecar, put("one.hs.test", json.dumps({"comment": comment}).encode())
    )
    assert status == 200 and json.loads(answer)["evidence"] == comment
    log = ops_sidecar.log()[before:]
    lines = [line for line in log.splitlines() if "one.hs.test" in line]
    assert any(comment in line for line in lines), log


def test_verdicts_cli_without_a_token_hints_at_the_token_file(
    ops_sidecar: Sidecar, tmp_path: Path
) -> None:
    base = ["--ops-listen", f"127.0.0.1:{ops_sidecar.ops_port}"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*sidecar_command(), "verdicts", *args, *base],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    missing = cli("deny", "cli.hs.test")
    assert missing.returncode == 3
    assert "401" in missing.stderr and "pass --ops-token-file" in missing.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token-not-the-token\n")
    mismatched = cli("deny", "cli.hs.test", "--ops-token-file", str(wrong))
    assert mismatched.returncode == 3
    assert "not the one the sidecar reads" in mismatched.stderr


# -- a handler bug: 500 and one log line, not a traceback per request -----------------------


@pytest.fixture
def in_process_ops(
    tmp_path: Path,
) -> Iterator[tuple[asyncio.AbstractEventLoop, OpsServer, RunningSidecar]]:
    """The real sidecar and ops server on a loopback port, in this process, so a fault can be
    injected into one handler (nothing else here is replaced)."""
    settings = Settings.from_raw(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "nameserver": ["127.0.0.1:9"],
            "state_dir": str(tmp_path),
            "store": "memory",
        }
    )
    loop = asyncio.new_event_loop()
    sidecar = RunningSidecar(settings)
    server = OpsServer(sidecar)
    loop.run_until_complete(server.start(parse_authority(f"127.0.0.1:{free_port()}")))
    try:
        yield loop, server, sidecar
    finally:
        loop.run_until_complete(server.stop())
        sidecar.dns.close()
        loop.close()


def test_a_handler_bug_answers_500_and_logs_one_line(
    in_process_ops: tuple[asyncio.AbstractEventLoop, OpsServer, RunningSidecar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop, server, sidecar = in_process_ops
    assert server.address is not None
    port = server.address[1]

    def broken() -> list[object]:
        raise RuntimeError("injected\nfault")

    sidecar.entries = broken  # type: ignore[method-assign,assignment]

    async def hammer() -> list[bytes]:
        answers = []
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/verdicts HTTP/1.1\r\n\r\n")
            answers.append(await reader.read())
            writer.close()
        return answers

    with caplog.at_level(logging.DEBUG, logger="sidecar.ops"):
        answers = loop.run_until_complete(hammer())
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
            "error": "internal error; see the sidecar log"
        }
    records = [r for r in caplog.records if r.name == "sidecar.ops"]
    errors = [r for r in records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in records]
    message = errors[0].getMessage()
    assert errors[0].exc_info is None
    assert "RuntimeError: injected\\nfault" in message and "\n" not in message
    assert "1 such failures" in message
    traced = [r for r in records if r.levelname == "DEBUG" and r.exc_info]
    assert len(traced) == 1  # the traceback once, for --log-level debug
