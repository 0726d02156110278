"""One TCP connection attempt, to tell "nothing answers there" from "try it": the Hub probe (moral.agent) and the
Ray address probe (moral.sweep). Standard library only."""

from __future__ import annotations

import socket


def tcp_unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why no TCP connection to host:port opens within timeout_s ("connection refused", "unknown host ...", ...),
    or None if one does."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except socket.gaierror:
        return f"unknown host {host!r}"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    except OSError as exc:
        return f"{host}:{port}: {(exc.strerror or str(exc)).lower()}"
    return None
