"""The homeserver we serve: its admin API, the side-by-side view, and lifting a verdict
(resurrection check, `reset_connection`) when a server comes back."""
