"""The operators' side door: the ops HTTP API (metrics, health, verdicts) and event-loop lag."""
