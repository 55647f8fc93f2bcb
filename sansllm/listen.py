"""Where and how the server listens: hypercorn's config from the flags, and sockets bound early."""

from __future__ import annotations

import argparse
import socket

from hypercorn.config import Config as HypercornConfig

H11_MAX_INCOMPLETE_SIZE = 4 * 1024 * 1024  # as vLLM's uvicorn: room for large headers
GRACE_AFTER_DRAIN_SECONDS = 5.0


def hypercorn_config_from_args(args: argparse.Namespace) -> HypercornConfig:
    """Hypercorn's settings from the flags: address, TLS, ALPN (h2 offered unless --no-http2), logs."""
    config = HypercornConfig()
    config.bind = [f"unix:{args.uds}"] if args.uds else [_host_port(args.host, args.port)]
    if args.ssl_certfile:
        config.certfile = args.ssl_certfile
        config.keyfile = args.ssl_keyfile or args.ssl_certfile
        config.ca_certs = args.ssl_ca_certs
    config.alpn_protocols = ["h2", "http/1.1"] if args.http2 else ["http/1.1"]
    config.h11_max_incomplete_size = H11_MAX_INCOMPLETE_SIZE
    config.loglevel = args.log_level.upper()
    config.accesslog = "-"
    # SIGTERM/SIGINT first drains the app (AsgiApp.drain, --shutdown-timeout); what hypercorn then
    # waits for is only connections closing
    config.graceful_timeout = GRACE_AFTER_DRAIN_SECONDS
    return config


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_early(config: HypercornConfig) -> list[str]:
    """Bind and listen on `config`'s addresses now; rewrite `config` to serve those sockets.

    As vLLM does, the port is taken before the (slow) model load, so a busy port fails at once
    and clients connecting meanwhile wait in the backlog. Returns the bound addresses (port 0
    resolved), e.g. `127.0.0.1:8000` or `unix:/tmp/s.sock`.
    """
    sockets = config.create_sockets()
    addresses: list[str] = []

    def hand_over(socks: list[socket.socket]) -> list[str]:
        binds = []
        for sock in socks:
            sock.listen(config.backlog)
            addresses.append(describe(sock))
            binds.append(f"fd://{sock.detach()}")  # hypercorn owns the descriptor from here on
        return binds

    secure, insecure = hand_over(sockets.secure_sockets), hand_over(sockets.insecure_sockets)
    config.bind = secure or insecure
    config.insecure_bind = insecure if secure else []
    return addresses


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    return _host_port(name[0], name[1])
