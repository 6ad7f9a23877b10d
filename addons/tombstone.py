"""Entry script for a stock mitmproxy: `mitmdump -s addons/tombstone.py`.

Options are the sidecar's, prefixed: `--set tombstone_deny=old.example.org`. Run mitmdump
with `--set connection_strategy=lazy` so that a gone SNI is refused before anything is
dialled (the `tombstone-sidecar run` command sets this for you).
"""

from sidecar.proxy.addon import TombstoneAddon
from sidecar.proxy.admission import Admission

tombstone = TombstoneAddon()
# Admission first: proxy auth, header stripping and pre-auth limits before any decision.
addons = [Admission(tombstone.metrics, refuse_early=tombstone.refuse_early), tombstone]
