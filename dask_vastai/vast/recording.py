"""Every distinct shape of Vast's answers, written down for a bug report, secrets removed.

Much of Vast's API is undocumented (the bulk endpoints' answers, the rows of an outbid or a
destroyed rental), so what a user's account really answered is the best evidence there is.
With ``vastai.api.record-responses`` set to a file (``DASK_VASTAI__API__RECORD_RESPONSES``
in the environment, so that a Snakemake run's process records too), the transport appends one
JSON line per *new* shape: the method, the path with ids replaced by ``{id}``, the status, the
shape (types, keys, list lengths) and the first body seen in that shape, redacted:
``instance_api_key``, e-mail, balance and credit, tokens and keys, IP addresses and SSH keys
never reach the file. Lists in the example keep their first two items.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: keys whose values are personal or secret, whatever their type
_SECRET_KEYS = re.compile(
    r"api_key|apikey|token|secret|password|email|balance|credit|ssh_key|public_key|authorized_keys|"
    r"ipaddr|ip_addr|^ip$|username|fullname|phone|billing",
    re.IGNORECASE,
)
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
#: a full IPv6 address, or one with "::" (never a time such as 12:34:56)
_IPV6 = re.compile(r"(?:\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b|(?:\b[0-9a-f]{1,4})?(?::[0-9a-f]{1,4}){0,6}::"
                   r"(?:[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){0,6}\b)?)", re.IGNORECASE)
_SSH_KEY = re.compile(r"(ssh-(?:ed25519|rsa|dss)|ecdsa-sha2-[\w-]+|sk-ssh-[\w@.-]+) [A-Za-z0-9+/=]+")
_IDS = re.compile(r"/\d+(?=/|$)")
#: items of a list kept in an example body
_EXAMPLE_ITEMS = 2


def redact(value: Any, key: str = "") -> Any:
    """``value`` with everything personal or secret replaced by ``"<redacted>"``."""
    if key and _SECRET_KEYS.search(key) and value not in (None, "", [], {}):
        return "<redacted>"
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        value = _SSH_KEY.sub(r"\1 <redacted>", value)
        value = _IPV4.sub("<ip>", value)
        return _IPV6.sub("<ip>", value)
    return value


def shape(value: Any) -> Any:
    """The structure of a JSON value: types and keys, not values (lists: the union of their items)."""
    if isinstance(value, Mapping):
        return {str(k): shape(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list):
        items: dict[str, Any] = {}
        for v in value:
            items.setdefault(json.dumps(shape(v), sort_keys=True), shape(v))
        return [list(items.values())[:4]]
    if value is None:
        return "null"
    return type(value).__name__


def _trim(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _trim(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v) for v in value[:_EXAMPLE_ITEMS]] + ([f"... {len(value) - _EXAMPLE_ITEMS} more"]
                                                           if len(value) > _EXAMPLE_ITEMS else [])
    return value


class ResponseRecorder:
    """Appends each new (method, path, status, shape) of the answers it is shown to one file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        try:  # another process (a Snakemake run) may be recording into the same file
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                self._seen.add(self._key(entry["method"], entry["path"], entry["status"], entry["shape"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass

    @staticmethod
    def _key(method: str, path: str, status: int, body_shape: Any) -> str:
        return json.dumps([method, path, status, body_shape], sort_keys=True)

    def record(self, method: str, path: str, status: int, parsed: Any) -> None:
        """Write this answer down if its shape is new (never raises: a recorder must not break calls)."""
        try:
            template = _IDS.sub("/{id}", path)
            body_shape = shape(parsed)
            key = self._key(method, template, status, body_shape)
            with self._lock:
                if key in self._seen:
                    return
                self._seen.add(key)
                entry = {"time": round(time.time(), 3), "method": method, "path": template, "status": status,
                         "shape": body_shape, "example": _trim(redact(parsed))}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")
        except Exception as e:  # noqa: BLE001 - recording is a courtesy, never a failure
            logger.info("could not record a Vast answer into %s: %s", self.path, e)
