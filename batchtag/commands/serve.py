"""``batchtag serve``: its arguments, credentials from a file or the environment, and the
server in the foreground until interrupted."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from batchtag.commands import EXIT_USAGE
from batchtag.errors import Outcome, exit_status
from batchtag.taggers import DEFAULT_MIN_CONFIDENCE, LANGS, TAGGERS
from batchtag.taggers.base import STAGES_HELP


def add_serve_parser(commands: Any) -> None:
    p = commands.add_parser(
        "serve",
        help="serve the image-tag API locally with a real model",
        description="Serve POST /v1/detection/imagetag_detect and GET /healthz.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tagger", choices=TAGGERS, default="model")
    p.add_argument("--lang", choices=LANGS, default="zh")
    p.add_argument(
        "--no-faces",
        dest="faces",
        action="store_false",
        help="model tagger without its face stages (people come from the object detector's boxes only)",
    )
    p.add_argument(
        "--stages",
        metavar="LIST",
        help=STAGES_HELP,
    )
    p.add_argument(
        "--float-classifier",
        action="store_true",
        help="model tagger: the unquantized classifier (slower, for comparing; default: INT8)",
    )
    p.add_argument(
        "--min-confidence",
        type=int,
        default=DEFAULT_MIN_CONFIDENCE,
        metavar="N",
        help="model tagger: leave tags below N (0-100) out of the answers (default: %(default)s, "
        "set on an evaluation set's tuning half; 0 answers every tag)",
    )
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="JSON or TOML with a 'credentials' list of {appid, secret_id, secret_key[, bucket]} "
        "(an entry with a bucket accepts only requests signed for and naming that bucket); "
        "default: one entry from BATCHTAG_APPID/BATCHTAG_SECRET_ID/BATCHTAG_SECRET_KEY",
    )
    p.add_argument("--qps-limit", type=float, help="each appid's quota; requests over it get code 15")
    p.add_argument("--inject-latency-ms", type=float, default=0.0)
    p.add_argument("--inject-latency-jitter-ms", type=float, default=0.0)
    p.add_argument("--inject-error-rate", type=float, default=0.0)
    p.add_argument("--allow-private-urls", action="store_true")
    add_serve_limits(p)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log more, and one line per request (no secrets)"
    )


def add_serve_limits(p: argparse.ArgumentParser) -> None:
    """How long the server waits for slow clients, and how long a signature may live."""
    from batchtag.server import config as serve_defaults

    p.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=serve_defaults.DEFAULT_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="close a connection that sends no complete request head for this long: idle keep-alive "
        "connections and half-sent heads alike (default %(default)g)",
    )
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=serve_defaults.DEFAULT_BODY_TIMEOUT_S,
        metavar="SECONDS",
        help="answer HTTP 408 and close when a request's body has not fully arrived this long after "
        "its head (default %(default)g)",
    )
    p.add_argument(
        "--max-signature-ttl",
        type=positive_int,
        default=serve_defaults.DEFAULT_MAX_SIGNATURE_LIFETIME_S,
        metavar="SECONDS",
        help="refuse (code 9) signatures valid for longer than this (default %(default)d, one day)",
    )


def positive_float(text: str) -> float:
    return _positive(float, text)


def positive_int(text: str) -> int:
    return _positive(int, text)


def _positive(kind: Callable[[str], Any], text: str) -> Any:
    """A number of seconds that is more than zero (zero would refuse or cut off every request)."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def command_serve(args: argparse.Namespace) -> int:
    from batchtag.server import ServeConfig, load_credentials_file, serve_forever
    from batchtag.signing import Credentials

    try:
        if args.credentials:
            credentials = load_credentials_file(args.credentials)
        else:
            env = [os.environ.get(f"BATCHTAG_{n}", "") for n in ("APPID", "SECRET_ID", "SECRET_KEY")]
            if not all(env):
                raise ValueError(
                    "give --credentials FILE, or set BATCHTAG_APPID, BATCHTAG_SECRET_ID "
                    "and BATCHTAG_SECRET_KEY"
                )
            credentials = [Credentials(*env)]
        config = ServeConfig(
            host=args.host,
            port=args.port,
            tagger=args.tagger,
            lang=args.lang,
            faces=args.faces,
            min_confidence=args.min_confidence,
            stages=args.stages,
            float_classifier=args.float_classifier,
            credentials=credentials,
            qps_limit=args.qps_limit,
            inject_latency_ms=args.inject_latency_ms,
            inject_latency_jitter_ms=args.inject_latency_jitter_ms,
            inject_error_rate=args.inject_error_rate,
            allow_private_urls=args.allow_private_urls,
            access_log=args.verbose,
            idle_timeout_s=args.idle_timeout,
            body_timeout_s=args.body_timeout,
            max_signature_lifetime_s=args.max_signature_ttl,
        )
        serve_forever(config)
    except (ValueError, OSError) as exc:
        print(f"batchtag: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return exit_status(Outcome.ALL_OK)
