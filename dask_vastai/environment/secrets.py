"""Secrets kept out of what Vast stores.

Vast stores the ``env`` of a create request and shows it (``vastai show instances`` lists
it). So an ``env`` value wrapped in :class:`Secret`, and every entry of ``secret_env``, stay
out of that request: they travel inside the worker's incarnation file, over SSH, and only
the rest goes to Vast.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any


class Secret:
    """An ``env`` value that must never be stored by Vast: it reaches workers over SSH only.

    ``VastAICluster(env={"WANDB_API_KEY": Secret(key)})``. Its repr and str hide the value,
    so it does not leak into logs or tracebacks either; ``reveal()`` gives it back.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = str(value)

    def reveal(self) -> str:
        """The secret value (what the worker's environment gets)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


class SecretEnv(Mapping[str, str]):
    """Secret environment variables: a mapping whose values no repr, str or log line shows.

    Reading a value gives it back (the incarnation needs it); the values are kept as
    :class:`Secret` objects, so neither this mapping nor anything holding it (the cluster, its
    context, their ``__dict__``) shows them, in a traceback, a debugger or a log.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values = {str(k): v if isinstance(v, Secret) else Secret(v) for k, v in dict(values or {}).items()}

    def __getitem__(self, name: str) -> str:
        return self._values[name].reveal()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"SecretEnv({', '.join(self._values)})"

    __str__ = __repr__


#: ``scheme://user:password@`` in a URL: what :func:`redact_urls` hides
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@]+)@")


def redact_urls(text: str) -> str:
    """``text`` with the credentials of every URL in it hidden (``https://***@host/...``).

    For log lines and messages that name packages or index URLs (``git+https://TOKEN@...``,
    ``--index-url https://user:token@...``).
    """
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def split_env(
    env: Mapping[str, Any] | None, secret_env: Mapping[str, Any] | None = None
) -> tuple[dict[str, str], SecretEnv]:
    """``(public, secret)``: public entries go into Vast's create request, secret ones over SSH.

    The secret ones come as a :class:`SecretEnv`, which shows no value in any repr.

    Entries of ``env`` wrapped in :class:`Secret` and every entry of ``secret_env`` are secret.
    A name in both is an error: which value should win would be a guess.
    """
    public: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name, value in dict(env or {}).items():
        if isinstance(value, Secret):
            secret[str(name)] = value.reveal()
        else:
            public[str(name)] = str(value)
    for name, value in dict(secret_env or {}).items():
        if str(name) in public or str(name) in secret:
            raise ValueError(
                f"{name!r} is in both env and secret_env; give it once (in secret_env, or as "
                f"env={{{name!r}: Secret(...)}})"
            )
        secret[str(name)] = value.reveal() if isinstance(value, Secret) else str(value)
    return public, SecretEnv(secret)
