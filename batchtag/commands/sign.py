"""``batchtag sign``: print an Authorization value for calling the API by hand (curl).

The secret key comes from the environment (BATCHTAG_SECRET_KEY) or a file
(``--secret-key-file``), never from argv, where other users can read it in the process
list; it is never printed. The output is the signature only, which carries the plain-text
fields (appid, bucket, secret id, times) but not the key. See docs/api.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from batchtag.errors import ConfigError, Outcome, UsageError, exit_status
from batchtag.signing import DEFAULT_TTL_SECONDS, Credentials, sign

ENV_APPID, ENV_SECRET_ID, ENV_SECRET_KEY = "BATCHTAG_APPID", "BATCHTAG_SECRET_ID", "BATCHTAG_SECRET_KEY"


def add_sign_parser(commands: Any) -> None:
    p = commands.add_parser(
        "sign",
        allow_abbrev=False,  # `--secret-key KEY` must be an error, not a prefix of --secret-key-file
        help="print an Authorization value for a request by hand (see docs/api.md)",
        description="Print a v1 signature for the Authorization header. The secret key is read "
        f"from {ENV_SECRET_KEY} or --secret-key-file, never from the command line.",
    )
    p.add_argument("--appid", help=f"default: {ENV_APPID}")
    p.add_argument("--secret-id", help=f"default: {ENV_SECRET_ID}")
    p.add_argument(
        "--secret-key-file", metavar="FILE", help=f"a file holding the key (else {ENV_SECRET_KEY})"
    )
    p.add_argument("--bucket", default="", help="the bucket the request names, if any")
    p.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL_SECONDS,
        help=f"seconds it stays valid (default {DEFAULT_TTL_SECONDS})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)


def read_secret_key(path: str | None, environ: dict[str, str]) -> str:
    """The key from ``path`` (surrounding whitespace dropped) or the environment."""
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                key = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--secret-key-file {path}: {getattr(exc, 'strerror', None) or 'cannot be read'}"
            ) from None
        if not key:
            raise ConfigError(f"--secret-key-file {path} is empty")
        return key
    key = environ.get(ENV_SECRET_KEY, "")
    if not key:
        raise ConfigError(f"no secret key: set {ENV_SECRET_KEY} or give --secret-key-file FILE")
    return key


def signing_credentials(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Credentials:
    environ = dict(os.environ) if environ is None else environ
    appid = args.appid or environ.get(ENV_APPID, "")
    secret_id = args.secret_id or environ.get(ENV_SECRET_ID, "")
    missing = [flag for flag, value in (("--appid", appid), ("--secret-id", secret_id)) if not value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} missing (or {ENV_APPID}, {ENV_SECRET_ID})")
    if args.ttl <= 0:
        raise ConfigError("--ttl must be positive")
    return Credentials(appid, secret_id, read_secret_key(args.secret_key_file, environ))


def authorization_for(args: argparse.Namespace) -> str:
    """The Authorization value; raises ConfigError when something is missing."""
    return sign(signing_credentials(args), args.bucket, ttl=args.ttl)


def command_sign(args: argparse.Namespace) -> int:
    """Print the value on stdout; anything missing is one line on stderr, exit 2."""
    try:
        print(authorization_for(args))
    except UsageError as exc:
        print(f"batchtag: error: {exc.message}", file=sys.stderr)
        return exit_status(exc)
    return exit_status(Outcome.ALL_OK)
