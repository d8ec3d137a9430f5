"""The `onepass serve` subcommand: load the model once, then serve it over HTTP with uvicorn
until Ctrl-C."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any


def add_serve_parser(
    subparsers: argparse._SubParsersAction,
    add_model_args: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    from onepass.cli import add_speculative_args

    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server, with a page that shows speculation live",
        description="Serve the model over OpenAI's API (/v1/completions, /v1/chat/completions, "
        "/v1/models), with /health, /metrics (Prometheus) and a page at /. Requests run "
        "side by side, sharing each forward (continuous batching); more wait in a bounded "
        "queue.",
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    g.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="completions generated side by side, sharing each forward (default: %(default)s)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=32,
        metavar="N",
        help="requests waiting besides the running ones; more get 429 (default: %(default)s)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("ONEPASS_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $ONEPASS_API_KEY, or none)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds from arrival to the last token, queueing included; 0 = no limit "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        metavar="N",
        help="larger request bodies get 413 (default: %(default)s)",
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: %(default)s)",
    )
    r = p.add_argument_group("replicas (Ray Serve; needs the ray extra)")
    r.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="run N copies of the server, each with its own model, behind one HTTP route "
        "(Ray Serve); 1 serves in this process without Ray (default: %(default)s)",
    )
    r.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="torch threads per replica (default: the cores divided among the replicas, at "
        "least 1; without --replicas: torch's default)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="with --replicas: deploy on this running Ray cluster (`ray start --head`'s "
        "address) instead of starting Ray on this machine",
    )
    add_model_args(p)
    add_speculative_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> None:
    from onepass.cli import UsageError

    options = server_options(args)  # validate before loading
    spec = options.speculative_config
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.replicas > 1:  # only then is ray imported
        from onepass.server.ray_app import serve_replicas

        serve_replicas(args)
        return
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from onepass.server.app import create_app, uvicorn_server
    from onepass.server.scheduler import build_off_thread

    sock = listen(args.host, args.port)  # before loading: a busy port fails at once
    print(f"onepass serve: loading {args.model} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    llm = build_off_thread(lambda: load_and_measure(args, start))
    log_to_stderr()
    server = uvicorn_server(create_app(llm, options), args.host, args.port, args.log_level)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"onepass serve: http://{shown}:{port}/ (page), API at http://{shown}:{port}/v1; "
        f"default method: {spec.method if spec else 'plain decoding'}; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    if not options.api_key and not _loopback(args.host):
        print(
            f"onepass serve: warning: listening on {args.host} without --api-key: anyone who "
            "can reach this port can use the model",
            file=sys.stderr,
        )
    server.run(sockets=[sock])


def load_and_measure(args: argparse.Namespace, start: float) -> Any:
    """The LLM, with the cost curve `auto` uses measured (once per machine) before serving."""
    from onepass.cli import load_llm

    llm = load_llm(args)
    print(
        f"onepass serve: {llm.model_name} loaded in {time.perf_counter() - start:.1f} s "
        f"(context window {llm.max_model_len}); measuring the cost curve `auto` uses "
        "(once per machine) ...",
        file=sys.stderr,
        flush=True,
    )
    llm.cost_model()
    return llm


def server_options(args: argparse.Namespace) -> Any:
    """The ServerOptions the command line asks for (checked; a UsageError if not valid), also
    used by each Ray replica."""
    from onepass.cli import UsageError, speculative_config
    from onepass.config import SpeculativeConfig

    spec = SpeculativeConfig.parse(speculative_config(args))
    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.request_timeout < 0:
        raise UsageError(f"--request-timeout must be >= 0, got {args.request_timeout}")
    if args.max_body_bytes < 1024:
        raise UsageError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        extra = "pip install 'onepass[server]'"
        raise UsageError(f"onepass serve needs the server extra: {extra}") from None
    from onepass.server.app import ServerOptions

    return ServerOptions(
        speculative_config=spec,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        api_key=args.api_key or None,
        request_timeout=args.request_timeout or None,
        max_body_bytes=args.max_body_bytes,
    )


def log_to_stderr() -> None:
    """The scheduler's log (a failed request's traceback) in uvicorn's style, on stderr."""
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logging.getLogger("onepass.server").addHandler(handler)


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn, or a one-line error."""
    from onepass.cli import UsageError

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
