"""tombstone-sidecar: stop a Matrix homeserver from contacting decommissioned servers."""

__version__ = "0.1.0"
