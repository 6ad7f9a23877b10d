"""Unit tests of sidecar/synapse."""
