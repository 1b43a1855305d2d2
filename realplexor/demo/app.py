"""The sandbox's web application: its page and its small JSON back end.

    GET  /              the page (two panes: channels and the post form)
    GET  /static/NAME   the page's script and style sheet
    GET  /api/online    the current online list: {"version": n, "channels": {id: count}}
    POST /api/send      {"ids": "Alpha,Beta", "text": "...", "structured": false, "author": "..."}
                        publishes ONE message to every named channel through the
                        server's JSON API (POST /publish on the IN line);
                        200 {"ok": true, "ids": [...]}, 400/413 {"error": reason},
                        502 {"error": reason} when Realplexor refuses or is down

The browser never talks to this application for messages: it polls the
Realplexor server's WAIT line itself, through ``dklab_realplexor.js``.
"""
from __future__ import annotations

import html
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from ..client import Realplexor, RealplexorError
from .messages import DEFAULT_IDS, MAX_IDS, ONLINE_ID, BadInput, parse_post
from .online import OnlineList
from .publisher import JsonPublisher

log = logging.getLogger("realplexor.demo")

MAX_BODY = 16 * 1024
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml"}


def _static_text(name: str) -> str:
    return resources.files("realplexor.demo").joinpath("static", name).read_text("utf-8")


class Sandbox:
    """What the pages and the back end share: the IN-line clients and the settings.

    ``wait_url`` is the Realplexor server's WAIT line as browsers reach it
    (e.g. ``http://127.0.0.1:8088/``); ``client`` names the server and the
    sandbox's namespace; posts go through ``publisher`` (the JSON API).
    """

    def __init__(self, client: Realplexor, wait_url: str, online: OnlineList | None = None,
                 publisher: JsonPublisher | None = None):
        self.client = client
        self.wait_url = wait_url if wait_url.endswith("/") else wait_url + "/"
        self.online = online if online is not None else OnlineList(client)
        self.publisher = publisher if publisher is not None else JsonPublisher.like(client)

    def page(self) -> str:
        """The page, with the client script's URL and the page settings filled in."""
        settings = {"waitUrl": self.wait_url, "namespace": self.client.namespace,
                    "onlineId": ONLINE_ID, "defaultIds": list(DEFAULT_IDS), "maxIds": MAX_IDS}
        # Inside <script>, "<" must not open a tag: JSON allows it escaped.
        settings_js = json.dumps(settings).replace("<", "\\u003c")
        return (_static_text("index.html")
                .replace("{{script_url}}", html.escape(self.wait_url + "?identifier=SCRIPT"))
                .replace("{{settings}}", settings_js))

    def send(self, payload: Any) -> list[str]:
        """Check the form's payload and publish it with one ``POST /publish``; the channels."""
        post = parse_post(payload)
        self.publisher.publish(post.ids, post.data)
        return list(post.ids)


class SandboxHandler(BaseHTTPRequestHandler):
    """Routes one request to the Sandbox of its server."""

    server: "SandboxServer"
    server_version = "RealplexorSandbox"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.sandbox.page())
        elif path == "/api/online":
            self._json(200, self.server.sandbox.online.snapshot())
        elif path == "/favicon.ico" or path.startswith("/static/") and "/" not in path[len("/static/"):]:
            # Browsers ask for /favicon.ico whatever the page links; the SVG serves both.
            name = "favicon.svg" if path == "/favicon.ico" else path[len("/static/"):]
            kind = STATIC_TYPES.get(name[name.rfind("."):]) if "." in name else None
            try:
                text = _static_text(name) if kind else None
            except (FileNotFoundError, IsADirectoryError):
                text = None
            if text is None:
                self._send(404, "text/plain; charset=utf-8", "not found\n")
            else:
                self._send(200, kind, text)
        else:
            self._send(404, "text/plain; charset=utf-8", "not found\n")

    def do_POST(self) -> None:  # noqa: N802
        if urlsplit(self.path).path != "/api/send":
            self._json(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(411, {"error": "send a Content-Length"})
            return
        if not 0 <= length <= MAX_BODY:
            self._json(413, {"error": f"the request is too large (at most {MAX_BODY} bytes)"})
            return
        body = self.rfile.read(length)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._json(400, {"error": "the request body is not valid JSON"})
            return
        try:
            ids = self.server.sandbox.send(payload)
        except BadInput as exc:
            self._json(400, {"error": str(exc)})
        except RealplexorError as exc:
            log.warning("publish failed: %s", exc)
            self._json(502, {"error": f"Realplexor did not take the message: {exc.reason}"})
        else:
            self._json(200, {"ok": True, "ids": ids})

    def _json(self, status: int, value: Any) -> None:
        self._send(status, "application/json", json.dumps(value))

    def _send(self, status: int, content_type: str, text: str) -> None:
        body = text.encode("utf-8")
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base class name)
        log.debug("%s %s", self.address_string(), format % args)


class SandboxServer(ThreadingHTTPServer):
    """The sandbox's HTTP server: a thread per request, each with a timeout."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], sandbox: Sandbox, request_timeout: float = 30):
        self.sandbox = sandbox
        self.request_timeout = request_timeout
        super().__init__(address, SandboxHandler)

    def finish_request(self, request, client_address) -> None:
        request.settimeout(self.request_timeout)
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def serve_in_background(self) -> threading.Thread:
        """Serve on a daemon thread (for tests and the screenshot); stop with shutdown()."""
        thread = threading.Thread(target=self.serve_forever, name="sandbox-http", daemon=True)
        thread.start()
        return thread
