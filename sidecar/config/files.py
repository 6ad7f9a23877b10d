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


MAX_CREDENTIALS_BYTES = 1024 * 1024


def read_credentials(path: str) -> dict[str, str]:
    """Parse a `user:password` file; ValueError names the file and line that is wrong."""
    text = read_small_text(path, MAX_CREDENTIALS_BYTES)
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{path} line {number}: expected user:password")
        users[user] = password
    if not users:
        raise ValueError(f"{path} has no user:password line")
    return users
