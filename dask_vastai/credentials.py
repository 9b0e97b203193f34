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
#: how the keys ``dask-vastai emulator`` makes up begin (Vast's own are 64 hex digits), so that
#: one sent to Vast is recognised at once instead of being refused after a round trip
EMULATOR_KEY_PREFIX = "emu-"


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


def is_emulator_key(key: str) -> bool:
    return key.startswith(EMULATOR_KEY_PREFIX)


def is_vast_origin(host: str | None) -> bool:
    """``console.vast.ai`` and the other hosts of Vast itself."""
    host = (host or "").lower().rstrip(".")
    return host == "vast.ai" or host.endswith(".vast.ai")


def emulator_key_message(api_url: str) -> str:
    """What to do when an emulator's key is about to go to Vast itself."""
    return (
        f"The API key ({EMULATOR_KEY_PREFIX}...) is one `dask-vastai emulator` made, but the API URL is "
        f"{api_url}: point at the emulator with the two lines it printed, `export VAST_API_KEY={EMULATOR_KEY_PREFIX}...` "
        "and `export DASK_VASTAI__API_URL=http://127.0.0.1:<port>` (or pass api_url=, --api-url, "
        f"--vastaidask-api-url), or use your Vast key from {KEY_HELP_URL}."
    )
