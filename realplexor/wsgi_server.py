"""The WSGI engine's server: gevent's WSGIServer and a handler for connections that mostly wait.

The application is :class:`~realplexor.wait_wsgi.WaitApp`; this module
reads its requests (:mod:`realplexor.wsgi_head`), keeps their deadlines
(:mod:`realplexor.wsgi_deadlines`), waits for a poll's answer and writes
it. Each connection is one greenlet.
"""
from __future__ import annotations

import contextlib
import errno
import io
import re
import socket
import time
from functools import partial
from urllib.parse import unquote

from gevent.hub import get_hub
from gevent.pywsgi import Input, WSGIHandler, WSGIServer, _NoopLog, format_date_time
from greenlet import greenlet

from .clientlog import bad_request, escape, peer
from .eventloop import ACCEPT_PAUSE, Starvation, linger, out_of_files, peer_closed
from .protocol import ProtocolError
from .streams import transport_counts
from .wait import FIRST_BYTES, error_reply, render_reply
from .wait_wsgi import LongPoll
from .wsgi_deadlines import AnswerNotTaken, IdleTooLong, RequestTimedOut
from .wsgi_head import MAX_HEAD_BYTES, BadHead, SocketReader, read_head

_unquote_latin1 = partial(unquote, encoding="latin-1")
# The body of a request that has none.
_NO_BODY = Input(io.BytesIO(b""), 0)
_SENT_EARLY = render_reply(error_reply(ProtocolError(
    400, "a request sent before the previous poll's answer is not served: send it after the answer")))


def _client_error(ex: Exception, request_line: str) -> tuple[str, str]:
    """What pywsgi found wrong in a request (no client bytes), and all it said."""
    message = getattr(ex, "formatted_message", None)
    if message is not None:
        # pywsgi's own: "Invalid HTTP method: '...'", "Expected GET method; Got ..."
        return re.split(r"[:;]", message, maxsplit=1)[0], message
    return "unreadable request line or headers", f"{type(ex).__name__}: {ex}; request line {request_line!r}"


def _input_pending(sock) -> bool:
    """Whether the client has sent bytes not read yet."""
    return peer_closed(getattr(sock, "_sock", sock)) is False


# What pywsgi's handler sets on itself per request, with its class defaults.
_PYWSGI_ATTRIBUTES = ("status", "_orig_status", "response_headers", "code", "provided_date",
                      "provided_content_length", "close_connection", "time_start", "time_finish",
                      "headers_sent", "response_use_chunked", "connection_upgraded", "environ",
                      "application", "requestline", "response_length", "result", "wsgi_input",
                      "content_length", "request_version", "command", "path")
_PYWSGI_DEFAULTS = tuple((name, getattr(WSGIHandler, name)) for name in _PYWSGI_ATTRIBUTES)


class LongPollHandler(WSGIHandler):
    """pywsgi's handler, tuned for connections that mostly wait.

    - the request line and headers are parsed by httptools
      (:mod:`realplexor.wsgi_head`), not by ``http.client`` and ``email``,
      and the environ holds only the headers the WAIT line reads;
    - the connection's reader buffers only what is unread: a parked poll
      keeps no read buffer, and neither its environ nor its headers;
    - a poll's answer is awaited here, not through a generator, and leaves
      in one send with its headers (a poll without keep-alive: the headers
      and first bytes at once, the body later);
    - a response that closes the connection is close-delimited, not
      chunked, as raw clients of the old server read to end of file;
    - deadlines (the request's, WAIT_TIMEOUT, the answer's, the next
      request's) are swept (:mod:`realplexor.wsgi_deadlines`), not a
      ``gevent.Timeout`` each;
    - no access-log line is formatted when none is written;
    - the client socket is in the environ, to notice a client that leaves;
    - a request it cannot read is the client's mistake: a 400 with the
      reason, answered before the connection lingers, and an INFO line
      with the client's bytes escaped (pywsgi logs it at ERROR, raw);
    - a client that leaves while sending its request is not logged.
    """

    # Every attribute pywsgi and this class set, as slots: a handler's
    # attributes outgrow a shared-key instance dict (1.5 KB per poll).
    __slots__ = ("socket", "client_address", "server", "rfile", "deadlines", "_served", "_poll",
                 "_reading", "_held", "_body_left", *_PYWSGI_ATTRIBUTES)
    # Rendered status lines and headers of polls, by what start_response was given.
    _heads: dict[tuple, bytes] = {}

    def __init__(self, sock, address, server):  # pylint: disable=super-init-not-called
        # pywsgi's own __init__ would allocate an 8 KB reader for good.
        for name, default in _PYWSGI_DEFAULTS:
            setattr(self, name, default)
        self._served = False
        self._poll: LongPoll | None = None
        self._reading = None    # the request deadline's section, while the request is read
        self._held: bytearray | None = None
        self._body_left = False
        self.socket = sock
        self.client_address = address
        self.server = server
        self.rfile = SocketReader(sock)
        self.deadlines = server.application.deadlines
        # The body follows the headers in a second write: without this it
        # may wait 40 ms for the client's delayed ACK.
        with contextlib.suppress(OSError):   # not a TCP socket (a UNIX one)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self):
        config = self.server.application.line.config
        self.deadlines.start()
        if self._served and not self._next_request_begins(config.WAIT_KEEPALIVE_TIMEOUT):
            return None     # idle for the keep-alive timeout, or gone
        self._served = True
        self._poll = None
        # The request line, headers and body must all arrive by this deadline;
        # the application ends it once it has read them (realplexor.request_read).
        self._reading = self.deadlines.request.enter(config.WAIT_REQUEST_TIMEOUT)
        try:
            result = self._serve_one(config.WAIT_MAXLEN + MAX_HEAD_BYTES)
        except RequestTimedOut:
            self._refusals.count("wait", 408)
            with contextlib.suppress(OSError):
                self._send_by_deadline(render_reply(error_reply(ProtocolError(
                    408, f"no complete request within WAIT_REQUEST_TIMEOUT "
                         f"({config.WAIT_REQUEST_TIMEOUT:g} s)"))))
            return None
        finally:
            self._request_read()
        poll = self._poll
        if poll is not None and poll.listener.early is not None:
            # Bytes came while the poll waited: refuse them, then close.
            if result is True:
                self._refusals.count("wait", 400)
                with contextlib.suppress(OSError):
                    self._send_by_deadline(_SENT_EARLY)
                    linger(self.socket)
            return None
        if isinstance(result, tuple):
            # A request that cannot be read: answer it here, then close gently.
            self.status, body = result
            with contextlib.suppress(OSError):
                self.socket.sendall(body)
                linger(self.socket)
            return None
        if result is None and self.socket is not None and (self._body_left or _input_pending(self.socket)):
            # Closing now would reset the connection, and the client could
            # lose the answer it has not read yet.
            linger(self.socket)
        return result

    def run_application(self):
        try:
            super().run_application()
        finally:
            body = self.wsgi_input
            if self.close_connection and body is not None and body is not _NO_BODY and (
                    body.position < (body.content_length or 0) or (body.chunked_input and body.chunk_length)):
                # The connection closes after this answer (a refusal above
                # all) with its body not read to the end: pywsgi would read
                # the rest first, and wait for ever on a body that never
                # ends. The connection lingers instead, for a bounded time.
                body._chunked_input_error = True
                self._body_left = True

    def _request_read(self) -> None:
        """The request is in: its deadline no longer holds."""
        reading, self._reading = self._reading, None
        if reading is not None:
            self.deadlines.request.leave(reading)

    def _serve_one(self, limit: int):
        """pywsgi's handle_one_request, reading the head with httptools (same results)."""
        if self.rfile.closed:
            return None
        try:
            if not self._read_head(limit):
                return None
        except BadHead as error:
            self._refusals.count("wait", error.status)
            if error.status == 400:
                bad_request("WAIT %s: 400 %s: %s", peer(self.client_address), error.reason, escape(error.data))
            return str(error.status), render_reply(error_reply(error))
        except OSError:
            return None     # gone while sending its request
        self.response_length = 0
        self.application = self.server.application
        self.handle_one_response()
        if self.close_connection or self.rfile.closed:
            return None
        return True

    def _read_head(self, limit: int) -> bool:
        """Read the next request's head and make its environ; False if the client left first."""
        head = read_head(self.rfile, limit)
        if head is None:
            return False
        target = head.target.decode("latin-1")
        self.command = head.method
        self.path = target
        self.request_version = version = "HTTP/" + head.version
        self.requestline = f"{head.method} {target} {version}"
        self.close_connection = not head.keep_alive
        headers = head.headers
        length = headers.get("CONTENT_LENGTH")
        self.content_length = int(length) if length else None
        path, _, query = target.partition("?")
        environ = self.server.get_environ()
        environ["REQUEST_METHOD"] = head.method
        environ["SCRIPT_NAME"] = ""
        environ["PATH_INFO"] = _unquote_latin1(path)
        environ["QUERY_STRING"] = query
        environ["SERVER_PROTOCOL"] = version
        if isinstance(self.client_address, tuple):
            environ["REMOTE_ADDR"] = str(self.client_address[0])
        environ.update(headers)
        chunked = headers.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        if chunked or self.content_length:
            self.wsgi_input = Input(self.rfile, self.content_length, chunked_input=chunked)
        else:
            self.wsgi_input = _NO_BODY   # reads nothing, ever: one for all
        environ["wsgi.input"] = self.wsgi_input
        environ["wsgi.input_terminated"] = True
        environ["realplexor.socket"] = self.socket
        environ["realplexor.request_read"] = self._request_read
        self.environ = environ
        return True

    def _handle_client_error(self, ex: Exception):
        # pywsgi's hook for a request body it finds malformed after the
        # reply began (it ignores the answer).
        if isinstance(ex, (ConnectionError, TimeoutError)):
            return None
        what, message = _client_error(ex, getattr(self, "requestline", ""))
        bad_request("WAIT %s: 400 malformed HTTP request: %s", peer(self.client_address), escape(message))
        self._refusals.count("wait", 400)
        return "400", render_reply(error_reply(ProtocolError(400, f"malformed HTTP request: {what}")))

    def _next_request_begins(self, patience: float) -> bool:
        """Wait up to ``patience`` s for a kept-alive connection's next request."""
        idle = self.deadlines.idle
        waiting = idle.enter(patience)
        try:
            return bool(self.rfile.peek(1))
        except (OSError, ValueError, IdleTooLong):
            return False
        finally:
            idle.leave(waiting)

    def log_request(self) -> None:
        if self.server.log.__class__ is not _NoopLog:
            super().log_request()

    def finalize_headers(self) -> None:
        super().finalize_headers()
        if self.close_connection and self.response_use_chunked:
            self.response_use_chunked = False
            self.response_headers = [(k, v) for k, v in self.response_headers
                                     if k.lower() != b"transfer-encoding"]

    def _poll_head(self, keep_alive: bool) -> bytes:
        """A poll's status line and headers, up to its Date (cached: polls share a few)."""
        key = (self.status, tuple(self.response_headers), keep_alive)
        head = self._heads.get(key)
        if head is None:
            lines = [b"HTTP/1.1 " + self.status]
            lines += [name + b": " + value for name, value in self.response_headers]
            head = b"\r\n".join(lines) + b"\r\n"
            if len(self._heads) > 64:   # many distinct origins: do not grow without end
                self._heads.clear()
            self._heads[key] = head
        return head

    def _write_with_headers(self, data: bytes) -> None:
        if self._held is not None:      # the whole response is being held
            super()._write_with_headers(data)
            return
        self._held = bytearray()
        try:
            super()._write_with_headers(data)
        finally:
            held, self._held = self._held, None
            if held:
                self._send_by_deadline(bytes(held))

    @property
    def _refusals(self):
        return self.server.application.line.refusals

    def process_result(self) -> None:
        if self.environ.get("realplexor.taken_over"):
            # A stream wrote its own response, and ends it by closing.
            self.status, self.headers_sent, self.close_connection = b"200 OK", True, True
            return
        poll = self.result
        if type(poll) is not LongPoll:
            # A complete answer: headers and body in one write.
            self._held = bytearray()
            try:
                super().process_result()
            finally:
                held, self._held = self._held, None
                if held:
                    self._send_by_deadline(bytes(held))
            return
        self._poll = poll
        self.headers_sent = True
        keep_alive = poll.keep_alive
        head = self._poll_head(keep_alive)
        # What a parked poll need not keep: its environ, its headers.
        self.environ = {}
        self.response_headers = None
        try:
            if not keep_alive:
                # A raw client of the old server reads the headers at once.
                self._send_by_deadline(head + _date_line() + b"\r\n" + FIRST_BYTES)
                body = poll.wait_by(self.deadlines)
                if body is not None:
                    self._send_by_deadline(body)
                return
            # A kept-alive poll's answer: headers, body and last chunk in one write.
            body = poll.wait_by(self.deadlines)
            self._send_by_deadline(head + _date_line() + b"Transfer-Encoding: chunked\r\n\r\n", _framed(body))
        finally:
            poll.close()

    def _sendall(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
        else:
            self._send_by_deadline(data)

    def _send_by_deadline(self, data: bytes, more: bytes = b"") -> None:
        # However slowly the client reads, an answer must be taken by
        # WRITE_TIMEOUT; pywsgi takes EPIPE as a client gone, quietly.
        # ``more`` follows ``data`` in the same system call, neither copied.
        size = len(data) + len(more)
        self.response_length += size
        sock = self.socket
        raw = getattr(sock, "_sock", None)
        if raw is not None:
            # Nearly always the kernel takes it all at once: no deadline to keep.
            try:
                sent = raw.sendmsg((data, more)) if more else raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == size:
                return
            data = (data + more)[sent:]
        elif more:
            data += more
        seconds = self.server.application.line.config.WRITE_TIMEOUT
        write = self.deadlines.write
        sending = write.enter(seconds)
        try:
            sock.sendall(data)
        except AnswerNotTaken:
            raise OSError(errno.EPIPE, f"answer not taken within WRITE_TIMEOUT ({seconds:g} s)") from None
        finally:
            write.leave(sending)


def _framed(body: bytes | None, _last=[None, b""]) -> bytes:  # noqa: B006 - one cache for the process
    """A kept-alive poll's body as one chunk and the last chunk.

    Every listener of a publish gets the same body object: it is framed once.
    """
    if body is None:
        return _EMPTY_CHUNKED
    if _last[0] is not body:
        data = FIRST_BYTES + body
        _last[0], _last[1] = body, b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    return _last[1]


_EMPTY_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(FIRST_BYTES), FIRST_BYTES)


def _date_line(_cache=[0, b""]) -> bytes:  # noqa: B006 - one cache for the process
    """``Date: ...`` and its line end, made once a second."""
    now = int(time.time())
    if _cache[0] != now:
        _cache[0], _cache[1] = now, b"Date: " + format_date_time(now) + b"\r\n"
    return _cache[1]


def spawn_connection(function, *args) -> greenlet:
    """Serve a connection in a greenlet of its own: a bare one.

    gevent's Greenlet would also keep, for each waiting poll, the stack it
    was spawned from and its place in the tree of greenlets (about 0.8 KB),
    and add its own frames under the handler's (a deeper stack to save
    at each switch). An exception the handler lets out is reported by the
    event loop, as for any bare greenlet.
    """
    hub = get_hub()
    connection = greenlet(function, hub)
    hub.loop.run_callback(connection.switch, *args)
    return connection


class WaitServer(WSGIServer):
    """gevent's WSGIServer, pausing quietly when it runs out of descriptors.

    gevent would log a traceback for every failed accept; here there is
    one line when it begins and one when it ends. Each connection is a
    bare greenlet (:func:`spawn_connection`) unless ``spawn`` says otherwise.
    """

    engine = "wsgi"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("spawn", spawn_connection)
        super().__init__(*args, **kwargs)
        self._starvation: Starvation | None = None
        self.open_connections = 0

    @property
    def streams(self) -> set:
        """The event streams and WebSockets its application serves now."""
        return self.application.streams

    def transport_counts(self) -> dict[str, int]:
        """Open connections by transport (a stream's connection stays this server's, counted open)."""
        streams = self.application.streams
        return transport_counts(self.open_connections - len(streams), streams)

    @property
    def accepting(self) -> bool:
        """Whether it takes connections: started, and its last accept did not fail for want
        of descriptors."""
        return self.started and (self._starvation is None or not self._starvation.active)

    def handle(self, sock, address):
        """Serve one connection (in its greenlet), counted while it is open."""
        self.open_connections += 1
        try:
            super().handle(sock, address)
        finally:
            self.open_connections -= 1

    def stop(self, timeout=None):
        super().stop(timeout)
        self.application.deadlines.stop()

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as exc:
            if not out_of_files(exc):
                raise
            if self._starvation is None:
                self._starvation = Starvation(peer(self.address))
            self._starvation.paused(exc)
            self.stop_accepting()
            self._timer = self.loop.timer(ACCEPT_PAUSE)
            self._timer.start(self._start_accepting_if_started)
            return None
        if accepted is not None and self._starvation is not None and self._starvation.active:
            self._starvation.fed()
        return accepted
