"""Where and how the server listens: hypercorn's config from the flags, and sockets bound early."""

from __future__ import annotations

import argparse
import socket

from hypercorn.config import Config as HypercornConfig

# hypercorn refuses a request head itself only past this multiple of the core's header limit (plus
# one read of slack): below it the core answers an oversized head with an OpenAI-shaped 431
HARD_HEADER_LIMIT_FACTOR = 2
HARD_HEADER_LIMIT_SLACK = 64 * 1024  # hypercorn reads 64 KiB at a time; h11 checks once per read
GRACE_AFTER_DRAIN_SECONDS = 5.0
LISTEN_BACKLOG = 2048


def hypercorn_config_from_args(args: argparse.Namespace) -> HypercornConfig:
    """Hypercorn's settings from the flags: address, TLS, ALPN (h2 offered unless --no-http2), logs."""
    config = HypercornConfig()
    # hypercorn's default of 100 drops connection attempts in a burst of a few hundred clients (seen
    # as TcpExtListenOverflows with 256 at once); uvicorn, under vLLM, listens with 2048
    config.backlog = LISTEN_BACKLOG
    config.bind = [f"unix:{args.uds}"] if args.uds else [_host_port(args.host, args.port)]
    if args.ssl_certfile:
        config.certfile = args.ssl_certfile
        config.keyfile = args.ssl_keyfile or args.ssl_certfile
        config.ca_certs = args.ssl_ca_certs
    config.alpn_protocols = ["h2", "http/1.1"] if args.http2 else ["http/1.1"]
    set_header_limits(config, args.h11_max_incomplete_event_size)
    config.loglevel = args.log_level.upper()
    config.accesslog = "-"
    # SIGTERM/SIGINT first drains the app (AsgiApp.drain, --shutdown-timeout); what hypercorn then
    # waits for is only connections closing
    config.graceful_timeout = GRACE_AFTER_DRAIN_SECONDS
    return config


def set_header_limits(config: HypercornConfig, max_header_bytes: int) -> None:
    """Hypercorn's own limits on a request head, set above the core's `max_header_bytes`.

    Why above: the core's refusal is a 431 in OpenAI's shape on both HTTP versions, while hypercorn's
    is an empty 431 and a closed connection (HTTP/1.1: h11's incomplete-event limit) or a GOAWAY
    ENHANCE_YOUR_CALM for the whole connection (HTTP/2: SETTINGS_MAX_HEADER_LIST_SIZE, 64 KiB by
    default, which would otherwise cut HTTP/2 far below the HTTP/1.1 limit). They stay as the
    backstop that keeps a flood of header bytes from being buffered."""
    hard = HARD_HEADER_LIMIT_FACTOR * max_header_bytes + HARD_HEADER_LIMIT_SLACK
    config.h11_max_incomplete_size = hard
    config.h2_max_header_list_size = hard


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
