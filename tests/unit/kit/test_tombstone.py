"""sidecar.kit.tombstone: what `tombstone NAME` renders, read back by the parsers that will read it.

The DNS records go through dnspython (as a zone file line) and then the sidecar's own TXT
and SRV code; the HTTP body through json; the config quoting through the rules nginx and
Caddy apply (the real servers run the snippets in tests/integration/test_kit_servers.py).
"""

from __future__ import annotations

import datetime
import json

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.judge.dns_answer import DnsAnswer
from sidecar.judge.signals import srv_targets
from sidecar.judge.tombstone_txt import is_tombstone, join_strings
from sidecar.kit import tombstone as kit

DAY = 86400
HOSTILE = 'it\'s $host {http.request.host} {$HOME} `x` "q" back\\slash; #hash é 🎉'


def rdata(line: str) -> tuple[str, object]:
    """Parse one generated zone-file line: (owner, rdata) as a resolver would hand it over."""
    owner, ttl, klass, rrtype, text = line.split(None, 4)
    assert int(ttl) > 0 and klass == "IN"
    return owner, dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rrtype), text)


def test_the_txt_record_round_trips_through_the_sidecars_parser() -> None:
    tombstone = kit.make("Example.ORG.", today=datetime.date(2026, 11, 27))
    [line] = kit.dns_records(tombstone)
    owner, record = rdata(line)
    assert owner == "example.org."
    text = join_strings(record.strings)  # type: ignore[attr-defined]
    assert text == "v=matrix;gone" and is_tombstone(text)


def test_the_srv_record_is_the_root_target_the_sidecar_calls_dns_srv_dot() -> None:
    tombstone = kit.make("example.org", srv=True, dns_ttl=7200)
    txt, srv = kit.dns_records(tombstone)
    assert txt.startswith("example.org. 7200 IN TXT")
    owner, record = rdata(srv)
    assert owner == "_matrix-fed._tcp.example.org."
    answer = DnsAnswer(owner, "SRV", "ok", (record,), 7200)
    assert srv_targets(answer) == [(".", 0)]


def test_the_body_is_a_matrix_error_naming_date_contact_and_successor() -> None:
    tombstone = kit.make(
        "example.org", date="2026-12-01", contact="admin@example.org", successor="new.example.org"
    )
    body = json.loads(kit.body_json(tombstone))
    assert body == {
        "errcode": "M_SERVER_DECOMMISSIONED",
        "error": "example.org was decommissioned on 2026-12-01 and no longer federates. "
        "Successor: new.example.org. Contact: admin@example.org.",
        "decommissioned": "2026-12-01",
        "successor": "new.example.org",
        "contact": "admin@example.org",
    }


def test_hostile_operator_text_survives_json_nginx_and_caddy_quoting() -> None:
    tombstone = kit.make("example.org", contact=HOSTILE, successor="{file./etc/passwd}")
    text = kit.body_json(tombstone)
    assert json.loads(text)["contact"] == HOSTILE
    assert json.loads(text)["successor"] == "{file./etc/passwd}"
    assert text.isascii()
    # Literal: only the JSON structure. No nginx variable, no quote that ends the config
    # string, no Caddy placeholder or backtick, no backslash but those of \uXXXX escapes.
    assert "$" not in text and "'" not in text and "`" not in text and ";" not in text
    assert text.count("{") == 1 and text.count("}") == 1
    assert text.replace("\\u", "").count("\\") == 0
    nginx = kit.render_nginx(tombstone)
    assert f"return 410 '{text.replace(chr(92), chr(92) * 2)}';" in nginx
    assert f"respond `{text}` 410" in kit.render_caddy(tombstone)


@given(
    st.text(
        st.characters(exclude_categories=["Cs", "Cc", "Cf", "Zl", "Zp", "Co", "Cn"]), max_size=60
    )
)
def test_any_printable_note_round_trips_and_stays_config_safe(note: str) -> None:
    tombstone = kit.make("example.org", contact=note)
    text = kit.body_json(tombstone)
    assert json.loads(text).get("contact", "") == note.strip()
    assert text.isascii() and not set(text) & set("$'`;#")
    assert text.count("{") == 1 and text.count("}") == 1


@pytest.mark.parametrize(
    ("max_age", "expected", "note"),
    [
        (30 * DAY, 30 * DAY, None),
        (7 * DAY, 7 * DAY, None),
        (90 * DAY, 30 * DAY, "--max-age 90d is longer than the 30 days MSC4188 allows"),
        (600, DAY, "--max-age 600s is shorter than MSC4188's 24 hours; using 1d"),
    ],
)
def test_max_age_is_clamped_to_msc4188s_range_and_says_so(
    max_age: int, expected: int, note: str | None
) -> None:
    tombstone = kit.make("example.org", max_age=max_age)
    assert tombstone.max_age == expected
    assert kit.cache_control(tombstone) == f"max-age={expected}"
    assert f'add_header Cache-Control "max-age={expected}" always;' in kit.render_nginx(tombstone)
    assert f'header Cache-Control "max-age={expected}"' in kit.render_caddy(tombstone)
    if note is None:
        assert tombstone.notes == ()
    else:
        assert len(tombstone.notes) == 1 and tombstone.notes[0].startswith(note)


def test_both_tombstone_paths_get_the_410() -> None:
    nginx = kit.render_nginx(kit.make("example.org"))
    assert "location ^~ /_matrix/ {" in nginx and "location ^~ /.well-known/matrix/ {" in nginx
    assert nginx.count("return 410 ") == 2
    caddy = kit.render_caddy(kit.make("example.org"))
    assert "@tombstone path /_matrix/* /.well-known/matrix/*" in caddy


def test_the_date_defaults_to_today() -> None:
    assert kit.make("example.org", today=datetime.date(2030, 1, 2)).date.isoformat() == "2030-01-02"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"raw_name": "bad..name"}, "NAME: 'bad..name' has an empty label"),
        ({"raw_name": "-x.org"}, "NAME: '-x.org': label '-x' starts or ends with '-'"),
        ({"raw_name": "192.0.2.1"}, "NAME: 192.0.2.1 is an IP literal; DNS tombstones need a name"),
        ({"date": "27.11.2026"}, "--date: '27.11.2026' is not a date like 2026-11-27"),
        ({"date": "2026-02-30"}, "--date: '2026-02-30' is not a date like 2026-11-27"),
        ({"contact": "a\nb"}, "--contact: contains the control character '\\n'; give one line"),
        ({"successor": "x" * 301}, "--successor: 301 characters; keep it under 300"),
    ],
)
def test_bad_input_is_one_precise_error(kwargs: dict[str, str], error: str) -> None:
    raw_name = kwargs.pop("raw_name", "example.org")
    with pytest.raises(kit.KitError) as raised:
        kit.make(raw_name, **kwargs)  # type: ignore[arg-type]
    assert str(raised.value).startswith(error)
    assert "\n" not in str(raised.value)


def test_a_name_with_a_port_keeps_its_port_for_the_check_line() -> None:
    tombstone = kit.make("example.org:8448")
    assert (tombstone.name, tombstone.port) == ("example.org", 8448)
    assert "tombstone-sidecar check example.org:8448 --probe" in kit.render_text(tombstone)


def test_delegated_federation_hosts_get_their_own_txt_record() -> None:
    tombstone = kit.make("example.org", federation_hosts=["Matrix.Example.org:8448", "example.org"])
    lines = kit.dns_records(tombstone)
    assert [rdata(line)[0] for line in lines] == ["example.org.", "matrix.example.org."]
    assert all(is_tombstone(join_strings(rdata(line)[1].strings)) for line in lines)  # type: ignore[attr-defined]
    with pytest.raises(kit.KitError, match=r"^--federation-host: 'a\.\.b' has an empty label"):
        kit.make("example.org", federation_hosts=["a..b"])


def test_the_published_errcode_is_the_one_the_sidecar_answers_with() -> None:
    from sidecar.proxy.answers import ERRCODE_GONE  # imports mitmproxy, which the kit need not load

    assert kit.ERRCODE == ERRCODE_GONE
