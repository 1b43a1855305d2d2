"""docs/deploy.md's nginx configuration: it outlasts a long poll, and run for real (needs nginx) it
passes a poll's first bytes and its message at once and keeps its connection to the WAIT line, and
it passes event streams and WebSockets through."""
from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from conftest import ROOT, TIMEOUT, free_port, read_to_eof, spawn
from realplexor.config import Config

DEPLOY = ROOT / "docs" / "deploy.md"
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx")


def documented_nginx_config() -> str:
    """The one nginx block of docs/deploy.md."""
    blocks = re.findall(r"```nginx\n(.*?)```", DEPLOY.read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def nginx_config(base: Path, wait_port: int, tls_port: int, cert: Path, key: Path) -> str:
    """The documented block on test ports and files, in the least nginx needs around it."""
    block = documented_nginx_config()
    for documented, here in [("server 127.0.0.1:8088;", f"server 127.0.0.1:{wait_port};"),
                             ("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;"),
                             ("/etc/ssl/rpl.example.com/fullchain.pem", str(cert)),
                             ("/etc/ssl/rpl.example.com/privkey.pem", str(key))]:
        assert documented in block
        block = block.replace(documented, here)
    temp = "".join(f"{kind}_temp_path {base}/{kind};\n" for kind in
                   ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\nmaster_process off;\npid {base}/nginx.pid;\nevents {{ worker_connections 64; }}\n"
            f"http {{\naccess_log off;\n{temp}{block}}}\n")


def kept_connections_to(port: int) -> int:
    """Established connections from this host to 127.0.0.1:``port`` (the client side of each)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines
               if line.split()[2] == f"0100007F:{port:04X}" and line.split()[3] == "01")


@pytest.fixture
def nginx(tmp_path, tls_files, server_factory):
    """A server with WAIT_TIMEOUT 30 behind nginx on the documented configuration: (server, TLS port)."""
    server = server_factory(WAIT_TIMEOUT=30, STREAM_TRANSPORTS=["eventsource", "websocket"])
    tls_port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(tmp_path, server.wait_port, tls_port, *tls_files))
    process, output = spawn(["nginx", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)])
    try:
        server.wait_until(lambda: process.poll() is not None or _accepts(tls_port))
        assert process.poll() is None, output.text() + (tmp_path / "error.log").read_text()
        yield server, tls_port
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        return True
    except ConnectionRefusedError:
        return False


def test_nginx_waits_longer_than_a_long_poll():
    timeouts = re.findall(r"proxy_read_timeout (\d+)s;", documented_nginx_config())
    assert len(timeouts) == 1 and int(timeouts[0]) > Config().WAIT_TIMEOUT


def tls_to(port: int) -> ssl.SSLSocket:
    """A TLS connection to nginx on ``port`` (its test certificate is not checked)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return context.wrap_socket(raw, server_hostname="localhost")


def read_head(sock: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """A response's head, and what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


@needs_nginx
def test_a_poll_through_nginx_gets_its_message_and_the_upstream_connection_is_kept(nginx, cid):
    server, tls_port = nginx
    with tls_to(tls_port) as sock:
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: rpl.example.com\r\n"
                     "Connection: close\r\n\r\n".encode())
        # nginx keeps its upstream connection alive, so the poll's headers
        # come with its answer: wait until the server holds the poll.
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"through nginx"')
        rest = read_to_eof(sock)
    assert rest.startswith(b"HTTP/1.1 200")
    assert b'"data":"through nginx"' in rest
    server.wait_until(lambda: kept_connections_to(server.wait_port) == 1)


@needs_nginx
def test_a_websocket_through_nginx_opens_and_gets_its_message(nginx, cid):
    server, tls_port = nginx
    with tls_to(tls_port) as sock:
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: rpl.example.com\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"through nginx"')
        client = Connection(ConnectionType.CLIENT)
        client.receive_data(rest)
        messages = []
        while not messages:
            messages = [json.loads(event.data) for event in client.events() if isinstance(event, TextMessage)]
            if not messages:
                client.receive_data(sock.recv(65536))
    assert messages[0]["data"] == "through nginx"


@needs_nginx
def test_an_event_stream_through_nginx_gets_its_message_at_once(nginx, cid):
    server, tls_port = nginx
    with tls_to(tls_port) as sock:
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: rpl.example.com\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"through nginx"')
        while b'"data":"through nginx"' not in rest:
            chunk = sock.recv(65536)
            assert chunk, rest
            rest += chunk
