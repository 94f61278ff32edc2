"""Run settings: one dataclass, filled from flags > environment > --config TOML > defaults."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from batchtag import api
from batchtag.errors import ConfigError
from batchtag.records import Settings

LOCAL = "local"
ENV_PREFIX = "BATCHTAG_"
ENV_FIELDS = ("appid", "secret_id", "secret_key", "bucket", "endpoint", "cluster")


@dataclass
class RunConfig:
    sources: list[str] = field(default_factory=list)
    out: str = ""
    endpoint: str = LOCAL
    appid: str = ""
    secret_id: str = ""
    secret_key: str = field(default="", repr=False)  # never printed
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
    max_image_bytes: int = api.MAX_IMAGE_BYTES
    exclude: list[str] = field(default_factory=list)  # globs the directory walk leaves out
    include_hidden: bool = False  # walk hidden and system folders too
    retag: bool = False  # redo items whose records were made with other settings
    cluster: str | None = None  # "local:N" or a Dask scheduler address (see cluster.py)

    @property
    def is_local(self) -> bool:
        return self.endpoint == LOCAL

    def settings(self) -> Settings:
        """What shapes the tags, as records carry it: the endpoint without credentials,
        query or fragment; the tagger and language only where the run chooses them."""
        if self.is_local:
            return Settings(LOCAL, self.tagger, self.lang)
        return Settings(public_endpoint(self.endpoint))

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
        if self.tagger not in ("model", "color"):
            raise ConfigError("--tagger must be model or color")
        if self.lang not in ("zh", "en"):
            raise ConfigError("--lang must be zh or en")
        if self.cluster:
            from batchtag.cluster import ClusterError, parse_cluster_address

            try:
                parse_cluster_address(self.cluster)
            except ClusterError as exc:
                raise ConfigError(str(exc)) from None
        if not self.is_local:
            missing = [name for name in ("appid", "secret_id", "secret_key") if not getattr(self, name)]
            if missing:
                flags = ", ".join("--" + m.replace("_", "-") for m in missing)
                raise ConfigError(
                    f"--endpoint {self.endpoint} needs {flags} (or BATCHTAG_* environment variables)"
                )
            if not self.endpoint.startswith(("http://", "https://")):
                raise ConfigError("--endpoint must be an http:// or https:// URL, or 'local'")
        return self


def public_endpoint(endpoint: str) -> str:
    """``https://user:pw@Host:8443/base/?x=1`` -> ``https://host:8443/base``."""
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


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
    return settings


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
    merged: dict[str, Any] = {}
    if config_path:
        merged.update(read_toml(config_path))
    merged.update(read_env(environ))
    merged.update({k: v for k, v in flags.items() if v is not None})
    try:
        config = RunConfig(**merged)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return coerce_types(config).validate()


def coerce_types(config: RunConfig) -> RunConfig:
    """TOML and environment values arrive as whatever the user typed; check them once."""
    try:
        config.concurrency = int(config.concurrency)
        config.retries = int(config.retries)
        config.timeout = float(config.timeout)
        config.max_image_bytes = int(config.max_image_bytes)
        config.qps = None if config.qps in (None, 0) else float(config.qps)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad setting value: {exc}") from None
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
