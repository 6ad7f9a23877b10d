"""Unit tests of sidecar/dns."""
