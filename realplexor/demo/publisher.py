"""Publishing through the server's JSON API: ``POST /publish`` on the IN line.

The sandbox's posts go this way, to show the JSON API next to the Python
client (which its online list uses): one HTTP request per publish, made
with the standard library's ``http.client``.
"""
from __future__ import annotations

import http.client
import json
from typing import Any, Sequence

from ..client import Realplexor, RealplexorError


class JsonPublisher:
    """Publishes to one Realplexor server's ``POST /publish``, ids under ``namespace``.

    ``timeout`` bounds connecting and each read or write, in seconds.
    """

    def __init__(self, host: str, port: int, namespace: str = "", timeout: float = 10.0):
        self.host = host
        self.port = port
        self.namespace = namespace
        self.timeout = timeout

    @classmethod
    def like(cls, client: Realplexor) -> "JsonPublisher":
        """A publisher to the same server and namespace as ``client``."""
        return cls(client.host, client.port, client.namespace, client.timeout)

    def publish(self, ids: Sequence[str], data: Any) -> dict[str, str]:
        """Publish ``data`` to ``ids`` (without the namespace); each id's cursor.

        RealplexorError when the server refuses (with its status and reason)
        or cannot be reached.
        """
        body = json.dumps({"ids": [self.namespace + channel for channel in ids], "data": data})
        status, answer = self._post("/publish", body.encode("utf-8"))
        if status != 200:
            raise RealplexorError(str(answer.get("error", "refused")), status)
        cursors = answer["ids"]
        return {channel[len(self.namespace):]: cursor for channel, cursor in cursors.items()}

    def _post(self, path: str, body: bytes) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            raw = reply.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RealplexorError(f"cannot publish to {self.host}:{self.port}: {exc}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RealplexorError(f"not an answer of the JSON API: {raw[:100]!r}", reply.status)
        return reply.status, answer
