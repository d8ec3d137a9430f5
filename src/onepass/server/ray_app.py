"""onepass under Ray Serve: N replicas behind one HTTP route.

Each replica is a Ray actor that loads its own LLM, with its own torch threads, and runs the
very app `onepass serve` runs (create_app). Ray's HTTP proxy routes each request to a replica
(the less busy of two picked at random) and passes the response through, SSE streams
included. What a replica answers is what `onepass serve` answers: the same errors and
statuses, API key and body limit. /health and /metrics are those of the replica that answered;
every response names it in the X-Onepass-Replica header.

Two ways to run it:

    onepass serve --replicas 2 [--threads T] [--ray-address ADDR] ...
    serve run onepass.server.ray_app:build replicas=2 threads=4 method=auto ...

The first starts Ray on this machine (or joins a running cluster) and stops it on Ctrl-C; the
second deploys on a running cluster, with `onepass serve`'s options as key=value arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from onepass.server.cli import _loopback, listen, load_and_measure, log_to_stderr, server_options

APP_NAME = "onepass"
REPLICA_HEADER = b"x-onepass-replica"
# Ray's router holds back requests past max_ongoing_requests in flight at a replica; a replica
# whose batch and queue are full answers 429 (with Retry-After) itself, so Ray's limit stays
# this far above them.
ROUTER_MARGIN = 256


def default_threads(replicas: int) -> int:
    """This machine's cores divided among the replicas, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // replicas)


class ReplicaHeader:
    """ASGI middleware naming the replica in every response (which one served a request)."""

    def __init__(self, app: Any, name: str) -> None:
        self.app, self.name = app, name.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.name)]
            await send(message)

        await self.app(scope, receive, named)


@serve.deployment(name="OnepassReplica")
@serve.ingress()  # the app is built per replica, over its own LLM (__serve_build_asgi_app__)
class OnepassReplica:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from onepass.server.scheduler import build_off_thread

        # before loading: the kernels and the cost curve `auto` uses are per thread count
        torch.set_num_threads(args.threads)
        self.options = server_options(args)
        self.name = serve.get_replica_context().replica_id.unique_id
        # Measured (once per machine and thread count) before serving; off this thread, which
        # must not keep an OpenMP team beside the scheduler's (build_off_thread).
        self.llm = build_off_thread(lambda: load_and_measure(args, time.perf_counter()))
        log_to_stderr()  # to the replica's log (and the driver's console)

    def __serve_build_asgi_app__(self) -> Any:
        from onepass.server.app import create_app

        # an attribute of our own: the wrapper Ray puts around this class has `app`
        self.served = create_app(self.llm, self.options)
        self.served.add_middleware(ReplicaHeader, name=self.name)
        return self.served

    def check_health(self) -> None:
        """Ray's periodic probe: a replica whose scheduler died is replaced."""
        scheduler = self.served.state.scheduler  # the one /health reports on
        if not scheduler.alive and not scheduler.stopping:
            raise RuntimeError("the replica's scheduler is not running")


def deployment(args: argparse.Namespace) -> Any:
    """The Ray Serve application for `onepass serve`'s parsed options (args.replicas copies,
    args.threads torch threads and as many Ray CPUs each)."""
    args = argparse.Namespace(**vars(args))
    args.threads = args.threads or default_threads(args.replicas)
    args.func = None  # the CLI's handler: replicas need none
    return OnepassReplica.options(
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.threads},
        max_ongoing_requests=args.max_batch + args.max_queue + ROUTER_MARGIN,
        # a replica that cannot load its model (wrong name or path) will not load it on a retry
        max_constructor_retry_count=1,
        logging_config={"log_level": args.log_level.upper()},
    ).bind(args)


def build(options: dict[str, str]) -> Any:
    """`serve run onepass.server.ray_app:build key=value ...`: the keys are `onepass serve`'s
    options without their dashes (model=default replicas=2 threads=4 method=auto api-key=K);
    where Serve listens is `serve start`'s to say."""
    from onepass.cli import build_parser

    argv = ["serve"]
    for key, value in options.items():
        flag = key.replace("_", "-")
        if flag in ("host", "port", "ray-address"):
            raise ValueError(
                f"{key}= does not apply to serve run (the cluster: serve run --address; where "
                "Serve listens: serve start --http-host/--http-port)"
            )
        argv += [f"--{flag}", str(value)]
    args = build_parser().parse_args(argv)
    server_options(args)  # a bad value fails here, not in every replica
    return deployment(args)


def serve_replicas(args: argparse.Namespace) -> None:
    """`onepass serve --replicas N`: start Ray here (or join args.ray_address), deploy the
    replicas behind http://host:port/ and serve until Ctrl-C, then stop it all."""
    from onepass.cli import UsageError

    local = args.ray_address is None
    threads = args.threads or default_threads(args.replicas)
    if local:
        listen(args.host, args.port).close()  # a busy port fails at once, before Ray starts
    quiet = args.log_level != "debug"
    print(
        f"onepass serve: starting Ray and {args.replicas} replicas of {args.model} "
        f"({threads} threads each) ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        ray.init(
            address="local" if local else args.ray_address,
            # Ray places replicas by its CPU count: at least what they ask for, even past the cores
            num_cpus=max(args.replicas * threads, os.cpu_count() or 1) if local else None,
            include_dashboard=False,
            logging_level=logging.WARNING if quiet else logging.INFO,
        )
        # SIGTERM as Ctrl-C (after ray.init, which installs its own): either way Serve and Ray
        # are shut down before exiting
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        if quiet:
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(
            proxy_location="HeadOnly" if local else "EveryNode",
            http_options={"host": args.host, "port": args.port},
            # the controller's and proxy's own log, which Ray copies to this console
            logging_config={"log_level": "WARNING" if quiet else "INFO"},
        )
        try:
            serve.run(deployment(args), name=APP_NAME, route_prefix="/")
        except (RuntimeError, RayServeException) as e:  # a replica did not start, a route clash
            # the error itself is the last line (after the remote traceback, if any)
            reason = str(e).strip().splitlines()[-1]
            raise UsageError(f"the replicas did not start: {reason}") from None
        # on a cluster whose Serve was already running, its host and port stand, not ours
        http = getattr(serve.context._get_global_client(), "http_config", None)
        host, port = (http.host, http.port) if http else (args.host, args.port)
        shown = f"[{host}]" if ":" in host else host
        spec = server_options(args).speculative_config
        print(
            f"onepass serve: {args.replicas} replicas ready in "
            f"{time.perf_counter() - start:.1f} s; http://{shown}:{port}/ (page), API at "
            f"http://{shown}:{port}/v1; default method: "
            f"{spec.method if spec else 'plain decoding'}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        if not args.api_key and not _loopback(host):
            print(
                f"onepass serve: warning: listening on {host} without --api-key: anyone "
                "who can reach this port can use the model",
                file=sys.stderr,
            )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("onepass serve: stopping the replicas and Ray ...", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        if ray.is_initialized():
            try:
                with contextlib.suppress(RayServeException):  # nothing was deployed
                    if local:
                        serve.shutdown()
                    else:  # someone else's cluster: remove only this application
                        serve.delete(APP_NAME)
            finally:
                ray.shutdown()
