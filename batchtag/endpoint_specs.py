"""Several endpoints in the settings: ``[[endpoints]]`` tables in the TOML config, or a
repeated ``--endpoint`` for endpoints that share the run's credentials.

Each ``[[endpoints]]`` entry::

    [[endpoints]]
    url = "https://ap-shanghai.example.com"     # required
    name = "shanghai"                           # for messages and records (default scheme://host:port)
    appid = "1250000001"                        # default: the run's appid
    secret-id = "AKID..."                       # default: the run's secret id
    secret-key-file = "~/.config/batchtag/sh"   # or secret-key-env = "SH_SECRET_KEY";
                                                # default: the run's secret key
    qps = 10                                    # this endpoint's quota (default: the run's qps)
    weight = 1                                  # share of the load when no qps is set
    tagger = "model"                            # optional: what this endpoint runs ...
    lang = "zh"                                 # ... every endpoint must say the same

The API's answer does not say which model or language made the tags, so the client cannot
check that two endpoints tag alike. The config says it instead: endpoints that declare
different ``tagger`` or ``lang`` values are refused; leaving them out on every endpoint
says "the same service". The records' settings then name the ``service`` (a top-level
setting; default: the first endpoint's URL) instead of one endpoint, so adding or removing
an endpoint of the same service is not a settings change for the resume guard.

Messages name a setting, an entry's position or its name, never a value: values include
secrets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchtag.errors import ConfigError

KNOWN_KEYS = frozenset(
    {
        "url",
        "name",
        "appid",
        "secret_id",
        "secret_key_file",
        "secret_key_env",
        "qps",
        "weight",
        "tagger",
        "lang",
    }
)
TEXT_KEYS = ("url", "name", "appid", "secret_id", "secret_key_file", "secret_key_env", "tagger", "lang")


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint of the run, credentials resolved."""

    url: str
    appid: str
    secret_id: str
    secret_key: str = field(repr=False)
    qps: float | None = None
    name: str = ""  # for messages and records; scheme://host:port when not given
    weight: float = 1.0
    tagger: str | None = None
    lang: str | None = None


@dataclass(frozen=True)
class RunCredentials:
    """What an entry falls back to: the run's own settings."""

    appid: str
    secret_id: str
    secret_key: str = field(repr=False)
    qps: float | None = None


def check_entries(entries: Any, origin: str) -> list[dict[str, Any] | str]:
    """``endpoints`` as the TOML file gives it: a list of tables with known keys and types
    (dashes or underscores), or URL strings. Raises ConfigError naming the entry."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{origin}: 'endpoints' must be a list of [[endpoints]] tables")
    checked: list[dict[str, Any] | str] = []
    for number, entry in enumerate(entries, start=1):
        where = f"{origin}: endpoints entry {number}"
        if isinstance(entry, str):
            checked.append(entry)
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        table = {str(k).replace("-", "_"): v for k, v in entry.items()}
        unknown = sorted(set(table) - KNOWN_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s): {', '.join(unknown)}")
        if "url" not in table:
            raise ConfigError(f"{where}: 'url' is required")
        for key in TEXT_KEYS:
            if key in table:
                value = table[key]
                if key in ("appid", "secret_id") and isinstance(value, int) and not isinstance(value, bool):
                    table[key] = value = str(value)
                if not isinstance(value, str):
                    raise ConfigError(f"{where}: '{key.replace('_', '-')}' must be a string")
        for key in ("qps", "weight"):
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ConfigError(f"{where}: '{key}' must be a positive number")
                table[key] = float(value)
        if "secret_key_file" in table and "secret_key_env" in table:
            raise ConfigError(f"{where}: give secret-key-file or secret-key-env, not both")
        checked.append(table)
    return checked


@dataclass(frozen=True)
class UrlRules:
    """What config.py knows about endpoints and key files, handed in (config imports this
    module, so this one does not import config)."""

    check: Callable[[str], None]  # raises ConfigError for an unusable URL
    public_name: Callable[[str], str]  # scheme://host:port, for messages
    read_key_file: Callable[[str], str]  # the key from a file only its owner reads


def resolve(
    entries: Sequence[Mapping[str, Any] | str],
    run: RunCredentials,
    rules: UrlRules,
    environ: Mapping[str, str] | None = None,
) -> list[EndpointSpec]:
    """The run's endpoints with their credentials read; each missing value is the run's."""
    check_endpoint, public_url, read_secret_key_file = rules.check, rules.public_name, rules.read_key_file
    environ = os.environ if environ is None else environ
    specs = []
    for number, entry in enumerate(entries, start=1):
        table: Mapping[str, Any] = {"url": entry} if isinstance(entry, str) else entry
        label = str(table.get("name") or f"endpoint {number}")
        try:
            check_endpoint(table["url"])
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        key = run.secret_key
        if table.get("secret_key_file"):
            key = read_secret_key_file(os.path.expanduser(table["secret_key_file"]))
        elif table.get("secret_key_env"):
            key = environ.get(table["secret_key_env"], "")
            if not key:
                raise ConfigError(f"{label}: environment variable {table['secret_key_env']} is not set")
        spec = EndpointSpec(
            url=table["url"],
            appid=table.get("appid") or run.appid,
            secret_id=table.get("secret_id") or run.secret_id,
            secret_key=key,
            qps=table.get("qps", run.qps),
            name=table.get("name") or public_url(table["url"]),
            weight=table.get("weight", 1.0),
            tagger=table.get("tagger"),
            lang=table.get("lang"),
        )
        missing = [n for n in ("appid", "secret_id", "secret_key") if not getattr(spec, n)]
        if missing:
            raise ConfigError(
                f"{label} has no {', '.join(m.replace('_', '-') for m in missing)}: give it in its "
                "[[endpoints]] entry or for the whole run (--appid, --secret-id, --secret-key-file, BATCHTAG_*)"
            )
        specs.append(spec)
    refuse_repeats(specs)
    refuse_mixed_taggers(specs)
    return specs


def refuse_repeats(specs: Sequence[EndpointSpec]) -> None:
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"endpoint {twice[0]} is declared twice: give each endpoint once, or a distinct name"
        )


def refuse_mixed_taggers(specs: Sequence[EndpointSpec]) -> None:
    """One run's records come from one tagger and language (see the module docstring)."""
    kinds = {(s.tagger, s.lang) for s in specs}
    if len(kinds) > 1:
        described = "; ".join(f"{s.name}: tagger {s.tagger or '?'}, lang {s.lang or '?'}" for s in specs)
        raise ConfigError(
            f"the endpoints declare different taggers or languages ({described}): one run's records "
            "must come from one tagger and language; run them into separate OUT files"
        )


def first_url(entries: Sequence[Mapping[str, Any] | str]) -> str:
    first = entries[0]
    return first if isinstance(first, str) else str(first.get("url", ""))


def declared(entries: Sequence[Mapping[str, Any] | str], key: str) -> str | None:
    """The first entry's ``tagger`` or ``lang``; all entries agree once resolved."""
    first = entries[0]
    return None if isinstance(first, str) else first.get(key)
