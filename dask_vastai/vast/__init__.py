"""The Vast client: the one package that speaks HTTP to Vast (or to anything serving its API).

Why our own client and not the official SDK: the SDK is blocking ``requests`` (it would
stall the scheduler's event loop), retries for 0.4 s against rate limits of 1-5 s, pins
exact versions of cryptography, pillow and pycares, and returns loosely typed dicts.

- :mod:`.records`: the typed records of the wire (what a create sends and answers, the
  rows of search and of ``show instances``);
- :mod:`.query`: the ``vastai search offers`` query syntax, parsed as the SDK parses it;
- :mod:`.transport`: the HTTP transport, its retries and its typed errors;
- :mod:`.pacing`: the per-endpoint schedule, shared by this user's processes on one account;
- :mod:`.bulk`: reading the bulk endpoints' undocumented answers;
- :mod:`.recording`: every distinct answer shape, redacted, into a file for a bug report;
- :mod:`.client`: :class:`VastAPI`, the endpoints.

The rest of the product imports from here (``from .vast import VastAPI``).
"""

from .bulk import DestroyReport, looks_torn_down
from .client import BULK_CHUNK, VastAPI
from .records import CreatedInstance, CreateRequest, Instance, Offer
from .transport import DEFAULT_MIN_INTERVALS_S

__all__ = [
    "BULK_CHUNK", "DEFAULT_MIN_INTERVALS_S", "CreateRequest", "CreatedInstance", "DestroyReport", "Instance",
    "Offer", "VastAPI", "looks_torn_down",
]
