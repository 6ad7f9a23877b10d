"""A RESP2 parser that refuses a bulk string by its length prefix, before reading its body.

redis-py's parsers (and hiredis) read a bulk string whole once its `$<length>` line is
in: one `PUBLISH` of hundreds of megabytes on the verdict channel, by any client of the
shared Redis, would be buffered by every subscribed sidecar. The subscriber's connections
use this parser instead (chosen explicitly, so it holds whether hiredis is installed or
not): a declared length over the limit raises `OversizedReply` and the body stays unread
in the socket until the connection is dropped (redis-py disconnects a connection whose
read failed). Everything else on the connection is parsed by redis-py's own RESP2 parser.
"""

from __future__ import annotations

from redis._parsers import _AsyncRESP2Parser
from redis.exceptions import RedisError

# The hook this parser bounds: every bulk-string body goes through it in redis-py 5 to 8.
# Checked at import so that a redis-py without it fails loudly (the guard fails closed)
# instead of silently reading unbounded replies again.
if not callable(getattr(_AsyncRESP2Parser, "_read", None)):  # pragma: no cover
    raise ImportError("redis-py's async RESP2 parser has no _read(length): cannot bound it")


class OversizedReply(RedisError):
    """A bulk string declared longer than the connection accepts; its body was not read,
    so the connection is unusable and is dropped."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a bulk string of {size} bytes; at most {limit} are read")
        self.size = size
        self.limit = limit


class BoundedRESP2Parser(_AsyncRESP2Parser):
    """redis-py's async RESP2 parser with an upper bound on every bulk string's length.

    Subclass it with a `limit` (see `bounded_parser`): redis-py builds parsers from the
    class alone (`parser_class=`), one per connection."""

    limit = 0

    async def _read(self, length: int) -> bytes:
        if length > self.limit:
            raise OversizedReply(length, self.limit)
        data: bytes = await super()._read(length)
        return data


def bounded_parser(limit: int) -> type[BoundedRESP2Parser]:
    """A parser class for `parser_class=` whose connections read at most `limit` bytes of
    any one bulk string."""
    if limit <= 0:
        raise ValueError(f"the limit must be positive, not {limit}")
    return type(f"BoundedRESP2Parser{limit}", (BoundedRESP2Parser,), {"limit": limit})
