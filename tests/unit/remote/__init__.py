"""Unit tests of sidecar/remote."""
