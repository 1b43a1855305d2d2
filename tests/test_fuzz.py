"""Malformed requests thrown at both lines: never a 5xx, never an ERROR.

Deterministic: each line's cases come from a seeded generator, so a
failure names a case that fails again on the next run. After the cases
the server must still serve a poll and a publish, and its log must hold
no ERROR line, no traceback and no raw client bytes.
"""
from __future__ import annotations

import json
import random
import re
import socket
import struct

import pytest

from conftest import read_to_eof

SEED = 20241201
CASES = 1000
_STATUS_RE = re.compile(rb"^HTTP/\d\.\d (\d{3})", re.M)
_PRINTABLE = re.compile(r"[ -~]*\Z")
_ENDINGS = ("half-close", "half-close", "half-close", "close", "reset")


def _poll(rng: random.Random) -> bytes:
    return (b"GET /?identifier=fz%d&ncrnd=%d HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
            % (rng.randrange(5), rng.randrange(1000)))


def _post(rng: random.Random) -> bytes:
    body = b"identifier=fz%d\n" % rng.randrange(5)
    return b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _publish(rng: random.Random) -> bytes:
    body = b'{"n": %d}' % rng.randrange(1000)
    return (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nX-Realplexor: identifier=fz%d\r\n\r\n%s"
            % (len(body), rng.randrange(5), body))


def _junk(rng: random.Random, size: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(size))


def _with_header(request: bytes, header: bytes) -> bytes:
    head, _, rest = request.partition(b"\r\n")
    return head + b"\r\n" + header + b"\r\n" + rest


def _with_length(request: bytes, length: bytes) -> bytes:
    head, sep, body = request.partition(b"\r\n\r\n")
    head = re.sub(rb"\r\nContent-Length: [^\r]*", b"", head)
    return head + b"\r\nContent-Length: " + length + sep + body


# Each maker turns a valid request of the line into a malformed one.
def garbage(rng, valid):
    return _junk(rng, rng.randrange(1, 400))


def truncated(rng, valid):
    return valid[:rng.randrange(len(valid))]


def bad_method(rng, valid):
    method = rng.choice([b"get", b"G\x00T", b"BREW", b"\xff\xfe", b"-", b"M" * 300, b"CONNECT", b"PRI",
                         b"TRACE", b"PUT", b"GET GET"])
    return method + valid[valid.index(b" "):]


def bad_content_length(rng, valid):
    length = rng.choice([b"-1", b"-100", b"abc", b"1e3", b"0x10", b"99999999999999999999999999",
                         b"18446744073709551617", b"", b" 12 ", b"+5", b"5, 6", b"\xff", b"1" * 200])
    return _with_length(valid, length)


def short_body(rng, valid):
    head, _, body = valid.partition(b"\r\n\r\n")
    return _with_length(head + b"\r\n\r\n" + body, b"%d" % (len(body) + rng.randrange(1, 5000)))


def folded_header(rng, valid):
    fold = rng.choice([b" folded", b"\tfolded: x", b" ", b"\t", b" Content-Length: 5", b"  identifier=fz9"])
    if rng.random() < 0.5:
        return _with_header(valid, fold)
    head, sep, body = valid.partition(b"\r\n\r\n")
    return head + b"\r\n" + fold + sep + body


def nul_bytes(rng, valid):
    spot = rng.randrange(len(valid))
    return valid[:spot] + b"\x00" * rng.randrange(1, 4) + valid[spot:]


def not_utf8(rng, valid):
    spot = rng.randrange(len(valid))
    return valid[:spot] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe9t\xe9", b"\x80\x81"]) + valid[spot:]


def overlong(rng, valid):
    size = rng.choice([5000, 9000, 70000, 300000])
    where = rng.choice(["target", "header", "name", "many"])
    if where == "target":
        return valid.replace(b" HTTP/1.1", b"&x=" + b"a" * size + b" HTTP/1.1", 1)
    if where == "header":
        return _with_header(valid, b"X-Long: " + b"v" * size)
    if where == "name":
        return _with_header(valid, b"X" * size + b": v")
    return _with_header(valid, b"\r\n".join(b"X-H%d: v" % n for n in range(rng.choice([101, 500, 3000]))))


def old_or_new_http(rng, valid):
    return rng.choice([
        b"GET /?identifier=fz1\r\n",
        b"GET /?identifier=fz1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _junk(rng, 30),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        valid.replace(b"HTTP/1.1", rng.choice([b"HTTP/1.2", b"HTTP/9", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1",
                                               b"HTTP/1", b"HTTP/1.1.1", b"HTTP/-1.1", b"HTTP/1.x"]), 1),
    ])


def tls_hello(rng, valid):
    body = _junk(rng, rng.randrange(40, 300))
    return b"\x16\x03\x01" + struct.pack("!H", len(body)) + body


def duplicated_headers(rng, valid):
    return _with_header(valid, rng.choice([
        b"Content-Length: 3\r\nContent-Length: 4",
        b"Content-Length: 0\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        b"Host: a\r\nHost: b",
        b"Connection: close\r\nConnection: keep-alive",
        b"X-Realplexor: identifier=fz1\r\nX-Realplexor: identifier=fz2",
        b"Origin: http://a\r\nOrigin: http://b",
    ]))


def bad_chunks(rng, valid):
    head, _, body = valid.partition(b"\r\n\r\n")
    head = re.sub(rb"\r\nContent-Length: [^\r]*", b"", head)
    chunks = rng.choice([b"zz\r\n" + body, b"%x\r\n%s" % (len(body) + 10, body), b"5;" + b"e" * 9000,
                         b"ffffffffffffffffffff\r\n", b"%x\r\n%s\r\n0\r\nTrailer\x00: x\r\n\r\n" % (len(body), body),
                         b"%x\n%s\n0\n\n" % (len(body), body)])
    return head + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks


def odd_lines(rng, valid):
    return rng.choice([valid.replace(b"\r\n", b"\n"), valid.replace(b"\r\n", b"\r"),
                       valid.replace(b"\r\n", b"\n\r"), b"\r\n\r\n" + valid,
                       _with_header(valid, b"NoColonHere"), _with_header(valid, b": empty name"),
                       _with_header(valid, b"Bad Name: x"), _with_header(valid, b"X-\x7f: \x1b[31mred"),
                       valid.replace(b"/?", b"http://host/?", 1), valid.replace(b"/?", b"*?", 1),
                       valid.replace(b" /", b"  /", 1), valid.replace(b" /", b"\t/", 1)])


def mutated(rng, valid):
    data = bytearray(valid)
    for _ in range(rng.randrange(1, 8)):
        spot = rng.randrange(len(data))
        action = rng.randrange(3)
        if action == 0:
            data[spot] = rng.randrange(256)
        elif action == 1:
            del data[spot]
        else:
            data.insert(spot, rng.randrange(256))
    return bytes(data)


def in_line_oddities(rng, valid):
    return rng.choice([
        b"ONLINE \x00\x1b[2J\xff\n\n", b"WATCH 99999999999999999999999999999\n\n", b"WATCH -5 \x00\n\n",
        b"STATS " + b"x" * 5000 + b"\n\n", b"FROB\n\n", b"online\r\n\r\n",
        b"identifier=\xff\xfe@fz1\n\n\"x\"", b"identifier=a:b:c@@fz1\n\n\"x\"", b"identifier=" + b"@" * 300 + b"\n\n1",
        b"identifier=fz1\n\n\xff\xfe", b"identifier=fz1\n\n{\"a\": \"\x00\"}", b"identifier=fz1\n\n" + b"[" * 5000,
        b"identifier=fz1\n\n" + b"1" * 5000, b"X-Realplexor: identifier=" + b"9" * 500 + b":fz1\r\n\r\n1",
        b"identifier=fz1\n\n\"" + b"\\u0000" * 10 + b"\"",
    ])


MAKERS = [garbage, truncated, bad_method, bad_content_length, short_body, folded_header, nul_bytes,
          not_utf8, overlong, old_or_new_http, tls_hello, duplicated_headers, bad_chunks, odd_lines, mutated]


def cases(seed: int, valid_requests, makers=MAKERS):
    """``CASES`` malformed requests and how each ends, the same for a seed."""
    rng = random.Random(seed)
    for number in range(CASES):
        maker = makers[number % len(makers)] if number < 2 * len(makers) else rng.choice(makers)
        valid = rng.choice(valid_requests)(rng)
        yield number, maker.__name__, maker(rng, valid), rng.choice(_ENDINGS)


def throw(port: int, data: bytes, ending: str) -> bytes:
    """Send ``data``, end as told, and return what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except OSError:   # the server refused early and closed: fine
            pass
        if ending == "reset":
            # A zero linger time makes the close below a reset.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        if ending == "close":
            return b""
        try:
            sock.shutdown(socket.SHUT_WR)
            return read_to_eof(sock, timeout=10)
        except ConnectionResetError:
            return b""


def fuzz(server, port: int, seed: int, valid_requests, makers=MAKERS) -> None:
    """Throw every case at ``port``; fail on a 5xx or a server that stops answering."""
    seen = len(server.output.lines)
    for number, name, data, ending in cases(seed, valid_requests, makers):
        try:
            answer = throw(port, data, ending)
        except socket.timeout:
            pytest.fail(f"case {number} ({name}, {ending}) got no answer nor close: {data[:200]!r}")
        statuses = [int(status) for status in _STATUS_RE.findall(answer)]
        assert all(status < 500 for status in statuses), \
            f"case {number} ({name}, {ending}): {data[:300]!r}\n-> {answer[:300]!r}"
    assert server.process.poll() is None, "the server died"
    log = server.settled_log()[seen:]
    bad = [line for line in log if " ERROR " in line or "Traceback" in line or not _PRINTABLE.match(line)]
    assert not bad, "\n".join(log)


def still_serves(server, cid: str) -> None:
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"still here"')
    assert json.loads(poll.response().body[3:])[0]["data"] == "still here"


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_wait_line_survives_malformed_requests(server_factory, cid, engine):
    # A poll the client cannot be seen to leave (a GET with a body it still
    # holds) ends at WAIT_TIMEOUT: short, but long enough for the last check.
    server = server_factory(WAIT_ENGINE=engine, WAIT_TIMEOUT=3)
    fuzz(server, server.wait_port, SEED, [_poll, _post])
    still_serves(server, cid)


def test_in_line_survives_malformed_requests(server_factory, cid):
    server = server_factory(IN_TIMEOUT=5)
    fuzz(server, server.in_port, SEED + 1, [_publish, _post], MAKERS + [in_line_oddities] * 3)
    still_serves(server, cid)
