"""Asking DNS: the UDP/TCP transport, the client with single flight and deadlines, the
tombstone questions (TXT, SRV, A/AAAA) and the book of addresses a live name is dialled at."""
