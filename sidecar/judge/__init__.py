"""Judging whether a server is gone: names, tombstone signals, verdicts, the breaker and the
policy that decides. Pure rules over what DNS and HTTP said; the I/O lives in dns/ and remote/."""
