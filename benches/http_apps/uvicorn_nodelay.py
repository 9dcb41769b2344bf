"""uvicorn's own command line, with TCP_NODELAY on the connections of ``--workers N``.

Run by ``benches/bench_processes.py`` from uvicorn's venv, with uvicorn's options:

    python uvicorn_nodelay.py starlette_app:app --workers 2 ...

With ``--workers N`` (N > 1) uvicorn binds the listening socket itself, as
``socket.socket(family=AF_INET)``, whose ``proto`` is 0; the accepted sockets inherit
that ``proto``, and asyncio sets TCP_NODELAY only on sockets whose ``proto`` is
IPPROTO_TCP. So Nagle's algorithm stays on: a response written in two parts (headers,
then body, as Starlette's are) waits for the client's delayed ACK, about 40 ms on
Linux, and each keep-alive connection does about 25 requests/s whatever the server
(uvicorn issue #3149, open as of uvicorn 0.54). A benchmark would then time that
timer. This runs ``uvicorn.main`` unchanged except that the socket ``bind_socket``
returns is given ``proto`` IPPROTO_TCP (the same descriptor: only the attribute that
asyncio reads), as ``--workers 1`` has through ``getaddrinfo``. Harmless once uvicorn
sets it itself.
"""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.config import Config

_bind_socket = Config.bind_socket


def bind_socket(self: Config) -> socket.socket:
    sock = _bind_socket(self)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto != socket.IPPROTO_TCP:
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    return sock


Config.bind_socket = bind_socket  # type: ignore[method-assign]

if __name__ == "__main__":
    uvicorn.main()
