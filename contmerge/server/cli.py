"""``contmerge serve``: the merge server from the command line.

Only argparse at import time: ``contmerge.cli`` imports this module to build its parser for
every command, so FastAPI, uvicorn and torch are imported when ``serve`` actually runs.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from contmerge.data_cli import add_merge_options as add_data_options
from contmerge.merger_options import add_merger_arguments

DEFAULT_PORT = 8470


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the merge server (watched inbox + authenticated HTTP uploads)",
        description="Fold checkpoints as they arrive, one at a time, into a durable merge "
        "state: from a watched inbox directory and from authenticated HTTP uploads. Crash-safe: "
        "accepted uploads are spooled before they are acknowledged and a restart folds what "
        "was pending. Needs a token (--token-file or $CONTMERGE_TOKEN) unless "
        "--insecure-no-auth on a loopback host.",
    )
    add_merger_arguments(serve)
    serve.add_argument("--base", required=True, help="base model (file, sharded index or dir)")
    add_data_options(serve, calibration=False)
    serve.add_argument("--inbox", help="directory to watch for checkpoints (renamed into place)")
    serve.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between inbox scans (default 1)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT}; 0 picks a free one)"
    )
    serve.add_argument("--token-file", help="file holding the bearer token (else $CONTMERGE_TOKEN)")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="no authentication; refused unless --host is a loopback address",
    )
    serve.add_argument("--tls-cert", help="TLS certificate (PEM); serve HTTPS with --tls-key")
    serve.add_argument("--tls-key", help="TLS private key (PEM)")
    serve.add_argument(
        "--max-upload-bytes",
        type=positive(int),
        default=None,
        help="largest upload accepted, in bytes (default 16 GiB); larger ones get 413",
    )
    serve.add_argument(
        "--queue-size",
        type=positive(int),
        default=None,
        help="complete checkpoints that may wait for the writer (default 64); beyond it uploads "
        "get 503",
    )
    serve.add_argument(
        "--max-concurrent-uploads",
        type=positive(int),
        default=None,
        help="uploads whose body may be arriving at once (default 16), counted apart from the "
        "queue; beyond it uploads get 503",
    )
    serve.add_argument(
        "--upload-idle-timeout",
        type=positive(float),
        default=None,
        help="seconds an upload may send nothing before it is cut with 408 (default 30); also "
        "the grace period of --upload-min-rate",
    )
    serve.add_argument(
        "--upload-min-rate",
        type=positive(float, zero=True),
        default=None,
        help="bytes/s an upload must average once --upload-idle-timeout has passed, else it is "
        "cut with 408 (default 16384; 0 for no floor)",
    )
    serve.add_argument(
        "--max-tar-members",
        type=positive(int),
        default=None,
        help="most files and folders in a directory uploaded as a tar (default 10000)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.set_defaults(func=run_serve)


def positive(kind: type, zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a number above 0 (or at least 0 with ``zero``)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'above 0'}")
        return value

    return parse


def _bind(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so that ``--port 0`` can report the port it got."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _log_to_stderr(level: str) -> None:
    """The server's own log lines (folds, rejections, recovery), without touching the root
    logger of whatever process runs this."""
    logger = logging.getLogger("contmerge.server")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def run_serve(args: argparse.Namespace) -> int:
    from ..cli import missing_extra
    from ..merger_options import MergerOptions

    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as exc:
        return missing_extra("serve", exc)
    from .auth import AuthSetupError, is_loopback, load_token
    from .service import MergeService, ServeSettings

    _log_to_stderr(args.log_level)
    try:
        token = load_token(args.token_file, args.insecure_no_auth, args.host)
    except AuthSetupError as exc:
        print(f"contmerge serve: {exc}", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("contmerge serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if token is not None and not args.tls_cert and not is_loopback(args.host):
        print(
            "contmerge serve: warning: the token and the weights travel in clear text; "
            "use --tls-cert/--tls-key (or a TLS proxy) off loopback",
            file=sys.stderr,
        )
    limits = {
        key: value
        for key in (
            "max_upload_bytes",
            "queue_size",
            "max_concurrent_uploads",
            "upload_idle_timeout",
            "upload_min_rate",
            "max_header_bytes",
            "max_tar_members",
        )
        if (value := getattr(args, key)) is not None
    }
    options = MergerOptions.from_args(args)  # as merge reads them
    settings = ServeSettings(
        state=Path(args.state),
        base=args.base,
        strategy=options.strategy,
        hparams=dict(options.settings),
        linear=options.linear,
        max_relative_delta=options.max_relative_delta,
        inbox=Path(args.inbox) if args.inbox else None,
        poll_interval=args.poll_interval,
        out_dtype=args.out_dtype,
        objective=args.objective,
        model=args.model,
        threads=options.threads,
        **limits,
    )
    sock = _bind(args.host, args.port)
    try:
        service = MergeService(settings)  # ContmergeError (bad state, base) → exit 1 in main()
    except BaseException:
        sock.close()
        raise
    try:
        config = uvicorn.Config(
            create_app(service, token),
            ssl_certfile=args.tls_cert,
            ssl_keyfile=args.tls_key,
            log_level=args.log_level,
            timeout_graceful_shutdown=10,
        )
        scheme = "https" if args.tls_cert else "http"
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"contmerge serve: listening on {scheme}://{shown}:{port} "
            f"(state {settings.state}, {service.count} folded, {service.pending} pending)",
            flush=True,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.stop()
        service.close()
        sock.close()
    return 0
