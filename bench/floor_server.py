"""The floor: the least any Python server can do per poll and per publish.

This is not Realplexor and serves nobody. It speaks just enough of the
wire for compare.py's re-park and publish-rate scenarios (kept-alive
polls of one channel each, publishes with ``Content-Length``, ONLINE;
a poll that missed its channel's last message gets it at once)
and makes exactly the system calls a Realplexor-compatible server must
make: accept, read the request, send a poll's headers at once, send the
body, answer the publish, close. Nothing is validated, nothing queued,
no cursor is kept. One ``select.epoll`` loop, no gevent.

Whatever it reaches is an upper bound for a Python server on this
machine: the kernel's part of the work plus the thinnest Python around it.

    python floor_server.py WAIT_PORT IN_PORT
"""
from __future__ import annotations

import select
import socket
import sys

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/javascript; charset=utf-8\r\n"
        b"Cache-Control: no-store, no-cache, must-revalidate\r\n"
        b"Expires: Mon, 26 Jul 1997 05:00:00 GMT\r\n"
        b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n \r\n\r\n")
OK = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
MARKER = b"identifier="


def listener(port: int, defer: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(65535)
    if defer:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 10)
    sock.setblocking(False)
    return sock


class Floor:
    def __init__(self, wait_port: int, in_port: int):
        self.epoll = select.epoll()
        self.wait_listener = listener(wait_port, True)
        self.in_listener = listener(in_port, False)
        self.epoll.register(self.wait_listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.in_listener.fileno(), select.EPOLLIN)
        self.polls: dict[int, socket.socket] = {}      # fd -> kept-alive poll connection
        self.parked: dict[bytes, list[int]] = {}       # channel -> fds waiting on it
        self.channel_of: dict[int, bytes] = {}         # fd -> the channel it waits on
        self.unread: dict[int, socket.socket] = {}     # fd -> publish whose bytes are not there yet
        self.latest: dict[bytes, tuple[int, bytes]] = {}  # channel -> (number, chunks) of its last message
        self.counter = 0

    def run(self) -> None:
        wait_fd, in_fd = self.wait_listener.fileno(), self.in_listener.fileno()
        while True:
            for fd, _ in self.epoll.poll():
                if fd == wait_fd:
                    self.accept(self.wait_listener, self.new_poll)
                elif fd == in_fd:
                    self.accept(self.in_listener, self.publish)
                elif fd in self.unread:
                    self.epoll.unregister(fd)
                    self.publish(self.unread.pop(fd))
                else:
                    self.read_poll(self.polls[fd])

    @staticmethod
    def accept(sock: socket.socket, handle) -> None:
        for _ in range(64):
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            handle(conn)

    def new_poll(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        self.polls[fd] = conn
        self.epoll.register(fd, select.EPOLLIN)
        self.read_poll(conn)

    def read_poll(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        try:
            data = conn.recv(8192)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.forget(fd)
            return
        start = data.find(MARKER) + len(MARKER)
        cursor, _, channel = data[start:data.find(b" ", start)].rpartition(b":")
        latest = self.latest.get(channel)
        try:
            if latest is not None and latest[0] > int(cursor.partition(b".")[2] or 0):
                conn.send(HEAD + latest[1])     # published while this poll was away
                return
            self.parked.setdefault(channel, []).append(fd)
            self.channel_of[fd] = channel
            conn.send(HEAD)
        except OSError:
            pass

    def forget(self, fd: int) -> None:
        channel = self.channel_of.pop(fd, None)
        if channel is not None and fd in self.parked.get(channel, ()):
            self.parked[channel].remove(fd)
        self.epoll.unregister(fd)
        self.polls.pop(fd).close()

    def publish(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            self.unread[conn.fileno()] = conn
            self.epoll.register(conn.fileno(), select.EPOLLIN)
            return
        except OSError:
            data = b""
        if not data:
            conn.close()
            return
        if data.startswith(b"ONLINE"):
            counts = "".join(f"{c.decode()} {len(fds)}\n" for c, fds in self.parked.items() if fds)
            conn.send(OK.replace(b"Content-Length: 0", f"Content-Length: {len(counts)}".encode())
                      + counts.encode())
            conn.close()
            return
        start = data.find(MARKER) + len(MARKER)
        channel = data[start:data.find(b"\r\n", start)]
        self.counter += 1
        body = b'[{"ids":{"%s":"1.%d"},"data":%s}]' % (channel, self.counter,
                                                       data.partition(b"\r\n\r\n")[2])
        frame = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        self.latest[channel] = (self.counter, frame)
        for fd in self.parked.pop(channel, ()):
            del self.channel_of[fd]
            try:
                self.polls[fd].send(frame)
            except OSError:
                pass
        try:
            conn.send(OK)
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    Floor(int(sys.argv[1]), int(sys.argv[2])).run()
