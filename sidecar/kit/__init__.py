"""The decommissioning kit: what a retiring homeserver publishes (DNS records, nginx and
Caddy snippets) so that the rest of the federation stops calling."""
