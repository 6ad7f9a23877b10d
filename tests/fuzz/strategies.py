"""Shared hypothesis strategies: things that look almost like names, authorities, JSON."""

from __future__ import annotations

import string

from hypothesis import strategies as st

# An InvalidName message quotes the input and the label, each cut to 80 characters (up to 10
# characters apiece once escaped by repr) and the offending characters (at most 63): it has
# a bound that does not grow with the input. A message over this echoes unbounded input.
MAX_NAME_MESSAGE = 2500

LABEL_ALPHABET = string.ascii_letters + string.digits + "-_"
# Characters with a meaning somewhere in a name, an authority or a URL, and blanks.
SPECIAL = ".:[]%@/#?* \t\r\n\x00\u3002\uff0e\u00ad\u200b"

ascii_labels = st.text(LABEL_ALPHABET, min_size=0, max_size=70)
unicode_labels = st.text(
    st.characters(exclude_categories=["Cs"], max_codepoint=0x2FFFF), min_size=1, max_size=20
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6_spellings = st.ip_addresses(v=6).flatmap(
    lambda ip: st.sampled_from(
        [str(ip), ip.exploded, ip.exploded.upper(), f"[{ip}]", f"[{ip.exploded}]"]
    )
)


@st.composite
def dns_names(draw: st.DrawFn, max_labels: int = 6) -> str:
    """Mostly valid names in random case, some with IDNA labels or a trailing dot."""
    labels = draw(
        st.lists(
            st.one_of(ascii_labels.filter(bool), unicode_labels), min_size=1, max_size=max_labels
        )
    )
    name = ".".join(labels)
    if draw(st.booleans()):
        name = "".join(c.upper() if draw(st.booleans()) else c for c in name[:80]) + name[80:]
    return name + ("." if draw(st.booleans()) else "")


pieces = st.one_of(
    ascii_labels,
    unicode_labels,
    st.sampled_from(list(SPECIAL)),
    ipv4,
    ipv6_spellings,
    st.integers(-1, 99999).map(str),
    st.sampled_from(["localhost", "xn--", "xn--bcher-kva", "_matrix-fed._tcp", "invalid"]),
)

# Text that looks like a host, a host:port or a bracketed IPv6 literal, or almost does.
hostish = st.one_of(
    dns_names(),
    ipv4,
    ipv6_spellings,
    st.lists(pieces, min_size=1, max_size=12).map("".join),
    st.text(max_size=300),
)


@st.composite
def authorities(draw: st.DrawFn) -> str:
    host = draw(hostish)
    port = draw(st.one_of(st.none(), st.integers(-5, 70000).map(str), st.text(max_size=8)))
    if port is None:
        return host
    return f"{host}:{port}"


json_ints = st.one_of(
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),  # beyond float range
    # Beyond str(int)'s default 4300-digit limit. Built, not st.just(): hypothesis itself
    # cannot repr such a number (nor a strategy holding one).
    st.builds(pow, st.just(10), st.integers(4301, 5000)),
)
json_scalars = st.one_of(st.none(), st.booleans(), json_ints, st.floats(), st.text(max_size=60))
# Anything json.loads or yaml.safe_load could hand over (and a little more: nan, huge ints).
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=12,
)


# What json.dumps can write (ints beyond 4300 digits cannot be): request bodies.
json_documents = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=60)),
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=12,
)
