"""The key-value rendezvous of one job's processes on one machine.

``python -m cupyflash.distributed.launch`` serves it on 127.0.0.1 and hands its address to every
process in ``CUPYFLASH_RENDEZVOUS``; :meth:`NcclComm.from_env` publishes the NCCL unique id through
it (rank 0) and fetches it (the others), a fetch waiting until the key is there. One request per
connection: ``SET key\\n`` + the value, or ``GET key\\n``; the value is everything up to the end of
the stream.

(cupyx.distributed's TCPStore serves the same purpose but is private, runs its server through
``multiprocessing`` with an unpicklable bound method, which the spawn and forkserver start methods
cannot start, and fails a read of a key not yet written instead of waiting.)
"""
from __future__ import annotations

import socket
import socketserver
import threading

__all__ = ["ENV", "Server", "publish", "fetch"]

#: The environment variable that carries the server's ``host:port``.
ENV = "CUPYFLASH_RENDEZVOUS"


class Server:
    """A rendezvous served by a thread of this process until :meth:`close`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        values = {}
        changed = threading.Condition()

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                op, _, key = self.rfile.readline().decode().rstrip("\n").partition(" ")
                if op == "SET":
                    with changed:
                        values[key] = self.rfile.read()
                        changed.notify_all()
                    self.wfile.write(b"ok")
                elif op == "GET":
                    with changed:
                        changed.wait_for(lambda: key in values)
                        value = values[key]
                    self.wfile.write(value)

        self._server = socketserver.ThreadingTCPServer((host, 0), Handler)
        self._server.daemon_threads = True  # a GET nobody answers must not keep the launcher alive
        self.address = f"{host}:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="cupyflash rendezvous", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _request(address, message, timeout):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def publish(address: str, key: str, value: bytes, timeout: float = 60.0) -> None:
    """Store ``value`` under ``key``."""
    if _request(address, f"SET {key}\n".encode() + value, timeout) != b"ok":
        raise RuntimeError(f"cupyflash rendezvous at {address}: storing {key!r} was not acknowledged")


def fetch(address: str, key: str, timeout: float = 600.0) -> bytes:
    """The value of ``key``, once some process has published it (at most ``timeout`` seconds)."""
    try:
        value = _request(address, f"GET {key}\n".encode(), timeout)
    except TimeoutError:
        raise TimeoutError(f"cupyflash rendezvous at {address}: nobody published {key!r} within {timeout} s "
                           "(did rank 0 fail?)") from None
    if not value:
        raise RuntimeError(f"cupyflash rendezvous at {address}: the connection closed before {key!r} came")
    return value
