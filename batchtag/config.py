"""Run settings: one dataclass, filled from flags > environment > --config TOML > defaults.

Error messages name a setting and where it came from, never its value: values include
secrets, and an endpoint can carry a password.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from batchtag import api
from batchtag.errors import ConfigError
from batchtag.records import Settings
from batchtag.taggers import LANGS, TAGGERS, parse_stages

LOCAL = "local"
ENV_PREFIX = "BATCHTAG_"
ENV_FIELDS = ("appid", "secret_id", "secret_key", "secret_key_file", "bucket", "endpoint", "cluster")
MAX_FILE_BYTES = 200 * 1024 * 1024  # larger files are refused unread (default of max_file_bytes)


@dataclass
class RunConfig:
    sources: list[str] = field(default_factory=list)
    out: str = ""
    endpoint: str = LOCAL
    appid: str = ""
    secret_id: str = ""
    secret_key: str = field(default="", repr=False)  # never printed
    secret_key_file: str = ""  # where the secret key is read from, unseen by `ps`
    bucket: str = ""
    concurrency: int = 16
    qps: float | None = None
    retries: int = 5
    timeout: float = 30.0
    progress: bool | None = None  # None: on when stderr is a terminal
    summary_json: str | None = None
    retry_errors: bool = False
    tagger: str = "model"  # the embedded server's tagger (endpoint = local only)
    lang: str = "zh"
    faces: bool = True  # the embedded model tagger's people stage (endpoint = local only)
    stages: str | None = None  # the embedded model tagger's stages, comma-separated; None: defaults
    float_classifier: bool = False  # the embedded model tagger's classifier unquantized (comparisons)
    max_image_bytes: int = api.MAX_IMAGE_BYTES
    exclude: list[str] = field(default_factory=list)  # globs the directory walk leaves out
    include_hidden: bool = False  # walk hidden and system folders too
    retag: bool = False  # redo items whose records were made with other settings
    cluster: str | None = None  # "local:N" or a Dask scheduler address (see cluster.py)
    max_file_bytes: int = MAX_FILE_BYTES
    outage_wait: float = 300.0  # an endpoint that answered, then went away: probe this long

    @property
    def is_local(self) -> bool:
        return self.endpoint == LOCAL

    def settings(self) -> Settings:
        """What shapes the tags, as records carry it: the endpoint without credentials,
        query or fragment; the tagger and language only where the run chooses them."""
        if self.is_local:
            return Settings(LOCAL, self.tagger, self.lang)
        return Settings(public_endpoint(self.endpoint))

    @property
    def endpoint_name(self) -> str:
        """The endpoint fit for messages: scheme, host and port only."""
        return public_url(self.endpoint)

    def validate(self) -> RunConfig:
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
        if self.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        if self.tagger not in TAGGERS:
            raise ConfigError(f"--tagger must be one of {', '.join(TAGGERS)}")
        if self.lang not in LANGS:
            raise ConfigError(f"--lang must be one of {', '.join(LANGS)}")
        try:
            parse_stages(self.stages)
        except ValueError as exc:
            raise ConfigError(f"--stages: {exc}") from None
        if self.cluster:
            from batchtag.cluster import ClusterError, parse_cluster_address

            try:
                parse_cluster_address(self.cluster)
            except ClusterError as exc:
                raise ConfigError(str(exc)) from None
        if self.outage_wait < 0:
            raise ConfigError("--outage-wait must be 0 or more")
        if self.max_file_bytes < 1:
            raise ConfigError("max-file-bytes must be positive")
        if self.secret_key_file and not self.secret_key:
            self.secret_key = read_secret_key_file(self.secret_key_file)
        if not self.is_local:
            check_endpoint(self.endpoint)
            missing = [name for name in ("appid", "secret_id", "secret_key") if not getattr(self, name)]
            if missing:
                flags = ", ".join("--" + m.replace("_", "-") for m in missing)
                raise ConfigError(
                    f"a remote --endpoint needs {flags} (or BATCHTAG_* environment variables; "
                    "the secret key also from --secret-key-file)"
                )
        return self


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


INT_FIELDS = ("concurrency", "retries", "max_image_bytes", "max_file_bytes")
FLOAT_FIELDS = ("qps", "timeout", "outage_wait")
BOOL_FIELDS = ("progress", "retry_errors", "include_hidden", "retag")
TEXT_OR_NUMBER_FIELDS = ("appid", "secret_id", "bucket")  # an appid is naturally written as a number


def typed_value(name: str, value: Any, origin: str) -> Any:
    """``value`` as the type of setting ``name``; a ConfigError naming the setting and
    ``origin`` (never the value) when it cannot be."""

    def wrong(kind: str) -> ConfigError:
        return ConfigError(f"{origin}: setting '{name.replace('_', '-')}' must be {kind}")

    if name in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
        return value
    if name in FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if name in BOOL_FIELDS:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if name in ("sources", "exclude"):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise wrong("a path or a list of paths")
        return values
    if name in TEXT_OR_NUMBER_FIELDS and isinstance(value, int) and not isinstance(value, bool):
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
        merged.update(secret_key_source(layer, merged))
    try:
        config = RunConfig(**merged)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return coerce_types(config).validate()


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
