"""Unit tests of sidecar/store."""
