"""Where the Vast API key comes from, and how it may be shown.

The same places the official ``vastai`` CLI looks, in the same order, so a user who ran
``vastai set api-key`` once needs nothing more: the argument (or ``vastai.api-key`` in the
dask config), then ``VAST_API_KEY``, then ``$XDG_CONFIG_HOME/vastai/vast_api_key``, then
``~/.vast_api_key``. The key itself is never printed: :func:`mask_key` shows its last four
characters at most.
"""

from __future__ import annotations

import os
from pathlib import Path

from .exceptions import MissingAPIKey

#: where a user creates a key
KEY_HELP_URL = "https://cloud.vast.ai/manage-keys/"


def key_file_paths() -> list[Path]:
    """The vastai CLI's key files, in the order it reads them."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(xdg) / "vastai" / "vast_api_key", Path.home() / ".vast_api_key"]


def where_keys_are_looked_for() -> str:
    """One sentence naming every place a key is looked for (for error messages)."""
    files = " or ".join(str(p) for p in key_file_paths())
    return f"the api_key argument, the dask config vastai.api-key, $VAST_API_KEY, or the file {files}"


def find_api_key(explicit: str | None = None) -> tuple[str, str]:
    """``(key, where it came from)``; :class:`MissingAPIKey` when no place has one."""
    if explicit is not None and str(explicit).strip():
        return str(explicit).strip(), "argument"
    env = os.environ.get("VAST_API_KEY", "").strip()
    if env:
        return env, "$VAST_API_KEY"
    for path in key_file_paths():
        try:
            text = path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        if text:
            return text, str(path)
    raise MissingAPIKey(
        f"No Vast API key found. Looked in {where_keys_are_looked_for()}. Create one at "
        f"{KEY_HELP_URL}, then `export VAST_API_KEY=<key>` (or `vastai set api-key <key>`, "
        "or pass api_key=...). To try everything for free first, run `dask-vastai emulator`."
    )


class APIKey:
    """The Vast API key as this process holds it: no repr, str or log line shows more than ``***abcd``.

    ``reveal()`` gives it to the one place that sends it (the ``Authorization`` header).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = str(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return mask_key(self._value)

    __str__ = __repr__


def mask_key(key: str | None) -> str:
    """``***abcd`` (the last four characters, only when the key is long enough to spare them)."""
    if not key:
        return "<none>"
    return "***" + key[-4:] if len(key) >= 12 else "***"
