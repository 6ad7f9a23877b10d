"""Talking to remote homeservers ourselves: the small HTTP client, 410 probes, signing-key
fetches, `check --probe` discovery, and the address classifier every dial passes."""
