"""Reading the small text files operators hand the sidecar (lists, tokens, credentials)."""

from __future__ import annotations

from pathlib import Path


def read_small_text(path: str, limit: int) -> str:
    """The UTF-8 text of `path`; ValueError says why it cannot be used (missing, too big,
    not UTF-8), naming the file."""
    file = Path(path)
    try:
        if file.stat().st_size > limit:
            raise ValueError(f"{path} is larger than {limit} bytes")
        return file.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
