"""A real `Policy` over a real resolver, with the collaborators the sidecar gives it
(sidecar/app.py): its DNS questions, an address book and an in-memory store."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sidecar.dns.address_book import AddressBook
from sidecar.dns.client import DnsClient
from sidecar.dns.questions import DnsQuestions
from sidecar.judge.policy import Policy
from sidecar.judge.ttl import TtlBounds
from sidecar.metrics import Metrics
from sidecar.store.base import VerdictStore


def policy_over(
    client: DnsClient,
    *,
    ttl: TtlBounds,
    cache_size: int,
    metrics: Metrics | None = None,
    max_stale: float = 3600.0,
    clock: Callable[[], float] = time.time,
    **kwargs: Any,
) -> Policy:
    metrics = metrics if metrics is not None else Metrics()
    book = AddressBook(client, metrics, max_stale=max_stale, maxsize=cache_size, clock=clock)
    return Policy(
        DnsQuestions(client),
        addresses=book,
        store=VerdictStore(metrics),
        metrics=metrics,
        ttl=ttl,
        cache_size=cache_size,
        clock=clock,
        **kwargs,
    )
