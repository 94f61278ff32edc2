"""Run settings: one dataclass, filled from flags > environment > --config TOML > defaults.

Error messages name a setting and where it came from, never its value: values include
secrets, and an endpoint can carry a password.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from batchtag import api
from batchtag.codes import DEFAULT_MAX_ATTEMPTS
from batchtag.endpoint_specs import (
    EndpointSpec,
    RunCredentials,
    UrlRules,
    check_entries,
    declared,
    first_url,
    resolve,
)
from batchtag.errors import DEFAULT_FAIL_ON, EXIT_STATUS, FAIL_ON_CHOICES, ConfigError, Outcome
from batchtag.records import Settings
from batchtag.taggers.base import LANGS, STAGES_HELP, TAGGERS, model_choice, parse_stages

LOCAL = "local"
ENV_PREFIX = "BATCHTAG_"
MAX_FILE_BYTES = 200 * 1024 * 1024  # larger files are refused unread (default of max_file_bytes)
CLUSTER_CONNECT_TIMEOUT_S = 10.0  # a scheduler on a LAN answers in milliseconds; Dask's own is 30 s
CLUSTER_TLS_FIELDS = ("cluster_tls_ca", "cluster_tls_cert", "cluster_tls_key")


def setting(
    default: Any = None,
    *,
    flags: tuple[str, ...] = (),
    help: str | None = None,
    env: bool = False,
    kind: str = "text",
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
    **cli: Any,
) -> Any:
    """A run setting, declared once: its default, its command-line flags (with any other
    argparse options in ``cli``) and help, whether ``BATCHTAG_<NAME>`` sets it, and its
    kind, which the TOML and environment readers check and convert by (``typed_value``).
    Every setting can be given in the ``--config`` TOML file, by its name with dashes."""
    metadata = {"flags": flags, "help": help, "env": env, "kind": kind, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass
class RunConfig:
    sources: list[str] = setting(  # noqa: RUF009 - setting() returns a dataclasses.field
        flags=("sources",),
        kind="paths",
        factory=list,
        nargs="+",
        metavar="SOURCE",
        help="a directory, an image, a .txt/.csv/.jsonl manifest, or - for stdin",
    )
    out: str = setting(
        "", flags=("-o", "--out"), required=True, help="results JSONL; also the resume checkpoint"
    )
    endpoint: str = setting(
        LOCAL,
        flags=("--endpoint",),
        env=True,
        action="append",
        help="API base URL, or 'local' (default) for the embedded tagger; repeat it for several "
        "endpoints that share the credentials (--qps is then each one's quota; [[endpoints]] in "
        "--config for endpoints with their own)",
    )
    appid: str = setting("", flags=("--appid",), env=True, kind="text_or_number", help="env BATCHTAG_APPID")
    secret_id: str = setting(
        "", flags=("--secret-id",), env=True, kind="text_or_number", help="env BATCHTAG_SECRET_ID"
    )
    secret_key: str = setting(  # never printed
        "",
        flags=("--secret-key",),
        env=True,
        secret=True,
        help="visible to other users in `ps`: prefer env BATCHTAG_SECRET_KEY or --secret-key-file",
    )
    secret_key_file: str = setting(  # where the secret key is read from, unseen by `ps`
        "",
        flags=("--secret-key-file",),
        env=True,
        metavar="FILE",
        help="read the secret key from FILE, which only its owner may read (chmod 600); "
        "env BATCHTAG_SECRET_KEY_FILE",
    )
    bucket: str = setting(
        "", flags=("--bucket",), env=True, kind="text_or_number", help="env BATCHTAG_BUCKET"
    )
    concurrency: int = setting(
        16, flags=("--concurrency",), kind="int", help="requests in flight (default 16)"
    )
    qps: float | None = setting(
        None, flags=("--qps",), kind="float", help="requests started per second, at most (default: no limit)"
    )
    retries: int = setting(
        5, flags=("--retries",), kind="int", help="extra attempts for transient failures (default 5)"
    )
    timeout: float = setting(
        30.0, flags=("--timeout",), kind="float", help="seconds per request (default 30)"
    )
    outage_wait: float = setting(  # an endpoint that answered, then went away: probe this long
        300.0,
        flags=("--outage-wait",),
        kind="float",
        metavar="S",
        help="an endpoint that answered and then went away is probed this long before the "
        "run stops with exit 2 (default 300); one that never answered stops it at once",
    )
    progress: bool | None = setting(  # None: on when stderr is a terminal
        None,
        flags=("--no-progress",),
        kind="bool",
        action="store_const",
        const=False,
        help="no progress bar (also automatic when stderr is not a terminal)",
    )
    summary_json: str | None = setting(
        None,
        flags=("--summary-json",),
        metavar="PATH",
        help="also write the end-of-run summary as JSON here ('-': stdout)",
    )
    retry_errors: bool = setting(
        False,
        flags=("--retry-errors",),
        kind="bool",
        action="store_true",
        help="do again the items whose record in OUT is an error",
    )
    exclude: list[str] = setting(  # noqa: RUF009 - globs the directory walk leaves out
        flags=("--exclude",),
        kind="paths",
        factory=list,
        action="append",
        metavar="GLOB",
        help="leave out files and folders whose name or path under the SOURCE matches (repeatable)",
    )
    include_hidden: bool = setting(
        False,
        flags=("--include-hidden",),
        kind="bool",
        action="store_true",
        help="also walk hidden files and folders and NAS/desktop thumbnail folders (@eaDir, ...)",
    )
    retag: bool = setting(
        False,
        flags=("--retag",),
        kind="bool",
        action="store_true",
        help="redo, into the same OUT, items whose records were made with another endpoint, tagger or lang",
    )
    tagger: str = setting(
        "model", flags=("--tagger",), choices=TAGGERS, help="embedded tagger (local endpoint only)"
    )
    lang: str = setting(
        "zh", flags=("--lang",), choices=LANGS, help="tag language of the embedded tagger (default zh)"
    )
    cluster: str | None = setting(
        None,
        flags=("--cluster",),
        env=True,
        metavar="ADDRESS",
        help="run on Dask: local:N (N worker processes here) or a scheduler address "
        "tcp://HOST:PORT or tls://HOST:PORT",
    )
    cluster_connect_timeout: float = setting(
        CLUSTER_CONNECT_TIMEOUT_S,
        flags=("--cluster-connect-timeout",),
        kind="float",
        metavar="S",
        help="seconds to reach the Dask scheduler and complete its handshake before the run "
        "stops with exit 2 (default 10)",
    )
    cluster_tls_ca: str = setting(
        "", flags=("--cluster-tls-ca",), metavar="FILE", help="tls:// scheduler: the CA certificate (PEM)"
    )
    cluster_tls_cert: str = setting(
        "",
        flags=("--cluster-tls-cert",),
        metavar="FILE",
        help="tls:// scheduler: this client's certificate (PEM, may include the key)",
    )
    cluster_tls_key: str = setting(
        "",
        flags=("--cluster-tls-key",),
        metavar="FILE",
        help="tls:// scheduler: the client certificate's key",
    )
    faces: bool = setting(
        True,
        flags=("--no-faces",),
        kind="bool",
        action="store_const",
        const=False,
        help="embedded model tagger without its face stages (local endpoint only)",
    )
    stages: str | None = setting(
        None,
        flags=("--stages",),
        metavar="LIST",
        help=STAGES_HELP + "; local endpoint only",
    )
    float_classifier: bool = setting(
        False,
        flags=("--float-classifier",),
        kind="bool",
        action="store_true",
        help="model tagger: the unquantized classifier (slower, for comparing; default: INT8)",
    )
    max_image_bytes: int = setting(api.MAX_IMAGE_BYTES, kind="int")  # --config only
    max_file_bytes: int = setting(MAX_FILE_BYTES, kind="int")  # larger files are refused unread
    endpoints: list[Any] = setting(  # noqa: RUF009 - [[endpoints]] tables, in --config only
        kind="endpoints", factory=list
    )
    service: str = setting("")  # several endpoints: what records' settings name (default: the first URL)
    dry_run: bool = setting(
        False,
        flags=("--dry-run",),
        kind="bool",
        action="store_true",
        help="count the items that are new, changed, copies, done or left out, the requests the run "
        "would send and their time at the quotas; send nothing, write nothing",
    )
    max_requests: int | None = setting(
        None,
        flags=("--max-requests",),
        kind="int",
        metavar="N",
        help=f"stop cleanly after N requests, every answer written (exit {EXIT_STATUS[Outcome.REQUEST_LIMIT]}); "
        "rerun to go on",
    )
    max_attempts: int = setting(  # runs that try a failure that settles (a dead link)
        DEFAULT_MAX_ATTEMPTS,
        flags=("--max-attempts",),
        kind="int",
        metavar="N",
        help=f"a failure that does not heal by retrying soon (a URL that answers 404, a 4xx) is tried "
        f"again by later plain runs until N runs have tried it, then left as an error until "
        f"--retry-errors (default {DEFAULT_MAX_ATTEMPTS}); within a run it gets one quick retry",
    )
    fail_on: str = setting(  # which outcomes exit non-zero: none, new, any (errors.py)
        DEFAULT_FAIL_ON,
        flags=("--fail-on",),
        choices=FAIL_ON_CHOICES,
        help=f"which outcomes exit non-zero: new errors of this run, any error OUT holds, or none "
        f"(default {DEFAULT_FAIL_ON}; the table below)",
    )

    @property
    def is_local(self) -> bool:
        return self.endpoint == LOCAL and not self.endpoints

    def settings(self) -> Settings:
        """What shapes the tags, as records carry it: the endpoint without credentials,
        query or fragment; the tagger and language only where the run chooses them."""
        if self.is_local:
            model = model_choice(parse_stages(self.stages), self.faces, not self.float_classifier)
            return Settings(LOCAL, self.tagger, self.lang, model if self.tagger == "model" else None)
        if self.endpoints:
            service = self.service or public_endpoint(first_url(self.endpoints))
            return Settings(service, declared(self.endpoints, "tagger"), declared(self.endpoints, "lang"))
        return Settings(public_endpoint(self.endpoint))

    @property
    def endpoint_name(self) -> str:
        """The endpoint fit for messages: scheme, host and port only."""
        return public_url(self.endpoint)

    def check_cluster_tls(self) -> None:
        """TLS files only with a tls:// scheduler, and the CA and certificate together (the
        files themselves are read by Dask when the run connects: no I/O here)."""
        given = [name for name in CLUSTER_TLS_FIELDS if getattr(self, name)]
        if given and not (self.cluster or "").startswith("tls://"):
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ConfigError(f"{flags} need a tls:// scheduler address in --cluster")
        if given and not (self.cluster_tls_ca and self.cluster_tls_cert):
            raise ConfigError("a tls:// scheduler needs both --cluster-tls-ca and --cluster-tls-cert")

    def validate(self) -> RunConfig:
        """Check the values, without I/O (a secret-key file counts as a key here; it is read
        by ``load_secret_key``)."""
        if not self.sources:
            raise ConfigError("no SOURCE given")
        if not self.out:
            raise ConfigError("-o/--out is required")
        if self.concurrency < 1:
            raise ConfigError("--concurrency must be at least 1")
        if self.qps is not None and self.qps <= 0:
            raise ConfigError("--qps must be positive")
        if self.retries < 0:
            raise ConfigError("--retries must be 0 or more")
        try:
            parse_stages(self.stages)
        except ValueError as exc:
            raise ConfigError(f"--stages: {exc}") from None
        if self.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        if self.tagger not in TAGGERS:
            raise ConfigError(f"--tagger must be one of {', '.join(TAGGERS)}")
        if self.lang not in LANGS:
            raise ConfigError(f"--lang must be one of {', '.join(LANGS)}")
        if self.cluster:
            from batchtag.cluster import ClusterError, parse_cluster_address

            try:
                parse_cluster_address(self.cluster)
            except ClusterError as exc:
                raise ConfigError(str(exc)) from None
        self.check_cluster_tls()
        if self.cluster_connect_timeout <= 0:
            raise ConfigError("--cluster-connect-timeout must be positive")
        if self.outage_wait < 0:
            raise ConfigError("--outage-wait must be 0 or more")
        if self.max_attempts < 1:
            raise ConfigError("--max-attempts must be at least 1")
        if self.fail_on not in FAIL_ON_CHOICES:
            raise ConfigError(f"--fail-on must be one of {', '.join(FAIL_ON_CHOICES)}")
        if self.max_file_bytes < 1:
            raise ConfigError("max-file-bytes must be positive")
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError("--max-requests must be at least 1")
        if not self.endpoints and not self.is_local:
            check_endpoint(self.endpoint)
            given = {"appid": self.appid, "secret_id": self.secret_id, "secret_key": self.secret_key_given}
            missing = [name for name, value in given.items() if not value]
            if missing:
                raise ConfigError(f"a remote --endpoint needs {'; '.join(WHERE_TO_GIVE[m] for m in missing)}")
        return self

    @property
    def secret_key_given(self) -> bool:
        return bool(self.secret_key or self.secret_key_file)

    @property
    def endpoint_specs(self) -> list[EndpointSpec]:
        """Several endpoints, resolved by ``load_secret_key`` (empty for one endpoint)."""
        return self.__dict__.get("_endpoint_specs", [])

    def load_secret_key(self) -> RunConfig:
        """The secret key from ``secret_key_file`` (once; the one read of getting settings
        ready, kept out of ``validate``); with several endpoints, each one's credentials too
        (their key files and environment variables), none twice, one tagger."""
        if self.secret_key_file and not self.secret_key:
            self.secret_key = read_secret_key_file(self.secret_key_file)
        if self.endpoints:
            run = RunCredentials(self.appid, self.secret_id, self.secret_key, self.qps)
            rules = UrlRules(check_endpoint, public_url, read_secret_key_file)
            self.__dict__["_endpoint_specs"] = resolve(self.endpoints, run, rules)
        return self


# Where each credential is best given, safest first: the secret key from a private file or
# the environment, never --secret-key, which other users see in `ps`.
WHERE_TO_GIVE = {
    "appid": "the appid (--appid or BATCHTAG_APPID)",
    "secret_id": "the secret id (--secret-id or BATCHTAG_SECRET_ID)",
    "secret_key": "the secret key: a file only you can read (--secret-key-file FILE or "
    "BATCHTAG_SECRET_KEY_FILE) or BATCHTAG_SECRET_KEY",
}


def public_endpoint(endpoint: str) -> str:
    """``https://user:pw@Host:8443/base/?x=1`` -> ``https://host:8443/base``."""
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def check_endpoint(endpoint: str) -> None:
    """An http(s) URL with a host and no user name or password in it."""
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError("--endpoint is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--endpoint must be an http:// or https:// URL, or 'local'")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "--endpoint must not contain a user name or password (user:password@host); "
            "give credentials with --appid, --secret-id and --secret-key-file or BATCHTAG_SECRET_KEY"
        )


def public_url(endpoint: str) -> str:
    """scheme://host[:port] of ``endpoint``: no userinfo, path or query in messages."""
    try:
        parts = urlsplit(endpoint)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the endpoint"
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}"


def is_plain_http_to_another_host(endpoint: str) -> bool:
    """Plain http beyond this machine: a v1 signature is reusable until it expires, so it
    should not travel in clear text."""
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return False
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return False
    try:
        return not ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return True


FIELD_NAMES = {f.name for f in fields(RunConfig)}


def read_toml(path: str) -> dict[str, Any]:
    """Settings from a TOML file; keys may use dashes or underscores, as flags do."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s): {', '.join(unknown)}")
    for name, value in settings.items():
        settings[name] = typed_value(name, value, f"--config {path}")
    return settings


ENV_FIELDS = tuple(f.name for f in fields(RunConfig) if f.metadata["env"])
FLAG_FIELDS = tuple(f.name for f in fields(RunConfig) if f.metadata["flags"])
KINDS = {f.name: f.metadata["kind"] for f in fields(RunConfig)}


def typed_value(name: str, value: Any, origin: str) -> Any:
    """``value`` as the type of setting ``name``; a ConfigError naming the setting and
    ``origin`` (never the value) when it cannot be."""

    def wrong(kind: str) -> ConfigError:
        return ConfigError(f"{origin}: setting '{name.replace('_', '-')}' must be {kind}")

    kind = KINDS.get(name, "text")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "endpoints":
        return check_entries(value, origin)
    if kind == "paths":
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise wrong("a path or a list of paths")
        return values
    if kind == "text_or_number" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise wrong("a string")
    return value


def read_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = dict(os.environ) if environ is None else environ
    return {
        name: environ[ENV_PREFIX + name.upper()]
        for name in ENV_FIELDS
        if environ.get(ENV_PREFIX + name.upper())
    }


def build_config(
    flags: dict[str, Any], config_path: str | None = None, environ: dict[str, str] | None = None
) -> RunConfig:
    """Merge the layers; ``flags`` holds only options the user actually gave."""
    layers = [
        read_toml(config_path) if config_path else {},
        read_env(environ),
        {k: v for k, v in flags.items() if v is not None},
    ]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(endpoint_source(secret_key_source(layer, merged), merged))
    try:
        config = RunConfig(**merged)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return coerce_types(config).validate().load_secret_key()


def secret_key_source(layer: dict[str, Any], below: dict[str, Any]) -> dict[str, Any]:
    """A layer that gives the secret key one way overrides the other way in the layers
    below it (a --secret-key flag beats BATCHTAG_SECRET_KEY_FILE, and so on)."""
    if layer.get("secret_key") and layer.get("secret_key_file"):
        raise ConfigError("give the secret key once: --secret-key or --secret-key-file, not both")
    if layer.get("secret_key"):
        below.pop("secret_key_file", None)
    if layer.get("secret_key_file"):
        below.pop("secret_key", None)
    return layer


def endpoint_source(layer: dict[str, Any], below: dict[str, Any]) -> dict[str, Any]:
    """One endpoint or several: a layer that gives either overrides both below it. A repeated
    ``--endpoint`` arrives as a list: one URL is the plain single endpoint."""
    given = layer.get("endpoint")
    if isinstance(given, list):
        layer = dict(layer)
        if len(given) == 1:
            layer["endpoint"] = given[0]
        else:
            layer["endpoints"] = layer.pop("endpoint")
    if layer.get("endpoint"):
        below.pop("endpoints", None)
    if layer.get("endpoints"):
        below.pop("endpoint", None)
    return layer


def read_secret_key_file(path: str) -> str:
    """The key from a file only its owner can read (as ssh insists for private keys)."""
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"--secret-key-file {path}: not a regular file")
            if mode & 0o077:
                raise ConfigError(
                    f"--secret-key-file {path}: readable by others (mode {stat.S_IMODE(mode):o}); "
                    f"chmod 600 {path}"
                )
            key = handle.read(4096).strip()
    except OSError as exc:
        raise ConfigError(f"--secret-key-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--secret-key-file {path}: not UTF-8 text") from None
    if not key or "\n" in key:
        raise ConfigError(f"--secret-key-file {path}: must hold the key alone, on one line")
    return key


def coerce_types(config: RunConfig) -> RunConfig:
    """Flags arrive typed by argparse and TOML values are checked in ``read_toml``; the
    environment gives strings. Normalise what is left."""
    config.qps = None if config.qps in (None, 0) else float(config.qps)
    if isinstance(config.sources, str):
        config.sources = [config.sources]
    if isinstance(config.exclude, str):
        config.exclude = [config.exclude]
    if config.cluster is not None:
        config.cluster = str(config.cluster) or None
    for name in ("appid", "secret_id", "secret_key", "bucket", "endpoint", "out"):
        value = getattr(config, name)
        if not isinstance(value, str):
            setattr(config, name, str(value))
    return config
