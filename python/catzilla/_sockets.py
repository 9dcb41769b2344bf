"""Listening sockets: made here, served by the native server through their
descriptor, so that one socket can be shared by several processes."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

#: Connections the kernel queues before they are accepted. NOTE: Python's
#: and std's default of 128 overflowed under a burst of 500 connects, and
#: the clients over it waited a second to retry.
DEFAULT_BACKLOG = 1024


def listen_tcp(
    host: str, port: int, backlog: int = DEFAULT_BACKLOG, *, reuse_port_after_bind: bool = False
) -> socket.socket:
    """A TCP socket listening on ``host:port``; ``OSError`` names the address
    when it cannot be had (e.g. the port is in use). With
    ``reuse_port_after_bind`` it may start a ``SO_REUSEPORT`` group."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {host}:{port}: {exc}") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if reuse_port_after_bind:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.set_inheritable(False)
        return sock
    reason = last.strerror if last is not None and last.strerror else str(last)
    raise OSError(
        last.errno if last is not None else errno.EADDRNOTAVAIL,
        f"cannot listen on {host}:{port}: {reason}",
    )


def listen_tcp_group(
    host: str, port: int, count: int, backlog: int = DEFAULT_BACKLOG
) -> list[socket.socket]:
    """``count`` TCP sockets listening on one ``host:port`` with ``SO_REUSEPORT``:
    the kernel spreads new connections evenly over them (one per process).

    The first socket is bound without ``SO_REUSEPORT`` and joins the group
    only then, so a port already held by anyone, even another group of this
    user, is refused instead of shared."""
    first = listen_tcp(host, port, backlog, reuse_port_after_bind=True)
    group = [first]
    try:
        address = first.getsockname()
        for _ in range(count - 1):
            sock = socket.socket(first.family, socket.SOCK_STREAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if first.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError as exc:
        for sock in group:
            sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return group


def listen_unix(path: str, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A Unix socket listening at ``path``. A socket file left by a server
    that is gone is replaced; one in use, or any other file, is an error."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"cannot listen on {path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nothing answers: a stale socket file
        else:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {path}: a server is using it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def describe(sock: socket.socket) -> str:
    """Where ``sock`` listens, as a client would address it."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def adopt(fd: int) -> socket.socket:
    """The listening socket behind an inherited descriptor."""
    sock = socket.socket(fileno=fd)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
        sock.detach()
        raise ValueError(f"descriptor {fd} is not a listening socket")
    return sock
