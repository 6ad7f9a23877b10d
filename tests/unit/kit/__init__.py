"""Unit tests of sidecar/kit."""
