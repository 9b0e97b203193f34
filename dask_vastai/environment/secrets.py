"""Secrets kept out of what Vast stores.

Vast stores the ``env`` of a create request and shows it (``vastai show instances`` lists
it). So an ``env`` value wrapped in :class:`Secret`, and every entry of ``secret_env``, stay
out of that request: they travel inside the worker's incarnation file, over SSH, and only
the rest goes to Vast.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def split_env(
    env: Mapping[str, Any] | None, secret_env: Mapping[str, Any] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """``(public, secret)``: public entries go into Vast's create request, secret ones over SSH.

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
    return public, secret
