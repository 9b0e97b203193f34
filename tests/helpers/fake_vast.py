"""A stand-in for the one Vast endpoint an instance calls itself: destroying its own rental.

The on-instance loader and supervisor ``DELETE /api/v0/instances/<CONTAINER_ID>/`` with
``CONTAINER_API_KEY`` when the client is gone. :class:`FakeVast` records each such call as
``(path, "Bearer <key>")`` in :attr:`FakeVast.deletes`.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Sequence
from typing import Any


class FakeVast(http.server.ThreadingHTTPServer):
    """Answers DELETE with ``statuses`` in turn, then 200, recording path and bearer; serves at once.

    ``host``: where it listens; the host side of a sandbox's veth makes it reachable from
    inside, as Vast is, while ``127.0.0.1`` is not (for instances that must not destroy
    themselves). ``statuses``: to make the caller retry (``[429, 503]``).
    Stop it with :meth:`shutdown`, or use it as a context manager.
    """

    def __init__(self, host: str = "127.0.0.1", statuses: Sequence[int] = ()) -> None:
        self.deletes: list[tuple[str, str]] = []
        pending = list(statuses)
        deletes = self.deletes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_DELETE(self) -> None:
                deletes.append((self.path, self.headers.get("Authorization", "")))
                code = pending.pop(0) if pending else 200
                body = b'{"success": true}' if code == 200 else b"slow down"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__((host, 0), Handler)
        self.url = f"http://{host}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, name=f"FakeVast {self.url}", daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
