"""Unit tests of sidecar/judge."""
