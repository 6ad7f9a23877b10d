"""Options: declared once, read from flags, `TOMBSTONE_*` variables and YAML, validated
into typed settings; and the small operator files (lists, tokens, credentials)."""
