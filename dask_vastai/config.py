"""Load the shipped defaults into ``dask.config`` once, at import; write each option once.

As in dask-jobqueue, every option has exactly one default, in ``vastai.yaml``; code
reads it with ``dask.config.get("vastai.<key>", override_with=value)`` and nowhere else.
An option a class takes is written once more, as a field of a dataclass of options
(:func:`documented`): its name, type and doc line; the docstrings (:func:`option_docs`) and
the signatures that ``help()`` and notebooks show (:func:`option_parameters`) are built from
those fields, so that adding an option is one edit here and one in the YAML.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import textwrap
from typing import Any

import dask.config
import yaml

_DEFAULTS_PATH = os.path.join(os.path.dirname(__file__), "vastai.yaml")

with open(_DEFAULTS_PATH) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def option(key: str, value: Any = None) -> Any:
    """The value of option ``key``: ``value`` when given, else the configured default."""
    return dask.config.get(f"vastai.{key}", override_with=value)


def documented(doc: str, default: Any = None) -> Any:
    """A field of a dataclass of options: ``doc`` is its line in the docs; ``default`` None
    means "the default in ``vastai.yaml``", read when the option is used."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def option_docs(options: type, indent: str = "    ") -> str:
    """The docs of a dataclass of options, numpydoc style, for the docstrings of the classes that take them."""
    lines = []
    for f in dataclasses.fields(options):
        lines.append(f"{indent[:-4]}{f.name}:")
        lines.append(textwrap.fill(f.metadata["doc"], 92, initial_indent=indent, subsequent_indent=indent))
    return "\n".join(lines)


def option_parameters(
    options: type, *, kind: inspect._ParameterKind = inspect.Parameter.KEYWORD_ONLY,
) -> list[inspect.Parameter]:
    """A dataclass of options as signature parameters: name, default and annotation (as written)."""
    return [inspect.Parameter(f.name, kind, default=f.default, annotation=f.type) for f in dataclasses.fields(options)]
