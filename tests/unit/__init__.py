"""Unit tests: pure parsers and small pieces, no network, no processes."""
