"""Several endpoints in the settings: [[endpoints]] tables, a repeated --endpoint, what is
refused (mixed taggers, one endpoint twice, --cluster), and the group's settings."""

from __future__ import annotations

import pytest

from batchtag.config import ConfigError, build_config

BASE = {"sources": ["photos"], "out": "out.jsonl"}
RUN_CREDS = {"BATCHTAG_APPID": "100", "BATCHTAG_SECRET_ID": "run-id", "BATCHTAG_SECRET_KEY": "run-key"}


def config_from(tmp_path, text, flags=None, env=None):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    return build_config({**BASE, **(flags or {})}, str(toml), RUN_CREDS if env is None else env)


TWO_APPIDS = """
service = "imagetag"
[[endpoints]]
url = "https://a.example"
name = "first"
appid = 200
secret-id = "id-a"
secret-key-env = "KEY_A"
qps = 10
[[endpoints]]
url = "https://b.example:8443"
qps = 30
weight = 2
"""


def test_endpoints_tables_with_their_own_or_the_runs_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("KEY_A", "key-a")
    config = config_from(tmp_path, TWO_APPIDS)
    first, second = config.endpoint_specs
    assert (first.name, first.appid, first.secret_id, first.secret_key, first.qps) == (
        "first",
        "200",
        "id-a",
        "key-a",
        10.0,
    )
    assert (second.name, second.appid, second.secret_key, second.qps, second.weight) == (
        "https://b.example:8443",
        "100",
        "run-key",
        30.0,
        2.0,
    )
    assert not config.is_local
    assert config.settings().to_dict() == {"endpoint": "imagetag"}
    assert "key-a" not in repr(config) and "run-key" not in repr(config)


def test_a_repeated_endpoint_flag_shares_the_runs_credentials_and_qps(tmp_path):
    flags = {"endpoint": ["https://a.example", "https://b.example"], "qps": 5.0}
    config = build_config({**BASE, **flags}, None, RUN_CREDS)
    assert [(s.url, s.appid, s.qps) for s in config.endpoint_specs] == [
        ("https://a.example", "100", 5.0),
        ("https://b.example", "100", 5.0),
    ]
    # Default service: the first endpoint, so an OUT made with it alone goes on matching.
    assert config.settings().to_dict() == {"endpoint": "https://a.example"}
    one = build_config({**BASE, "endpoint": ["https://a.example"]}, None, RUN_CREDS)
    assert one.endpoint == "https://a.example" and not one.endpoints
    assert one.settings() == config.settings()


def test_a_flag_endpoint_overrides_the_files_endpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("KEY_A", "key-a")
    config = config_from(tmp_path, TWO_APPIDS, {"endpoint": ["https://c.example"]})
    assert config.endpoint == "https://c.example" and not config.endpoints


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[endpoints]]\nurl = "https://a.example"\ntagger = "model"\n[[endpoints]]\nurl = "https://b.example"\n'
         'tagger = "color"\n', "declare different taggers or languages"),
        ('[[endpoints]]\nurl = "https://a.example"\nlang = "zh"\n[[endpoints]]\nurl = "https://b.example"\n'
         'lang = "en"\n', "declare different taggers or languages"),
        ('[[endpoints]]\nurl = "https://a.example"\n[[endpoints]]\nurl = "https://a.example"\n', "declared twice"),
        ('[[endpoints]]\nurl = "ftp://a.example"\n', "endpoint 1: --endpoint must be an http"),
        ('[[endpoints]]\nurl = "https://a.example"\nqps = -1\n', "'qps' must be a positive number"),
        ('[[endpoints]]\nurl = "https://a.example"\npassword = "x"\n', "unknown setting(s): password"),
        ('[[endpoints]]\nname = "a"\n', "'url' is required"),
        ('[[endpoints]]\nurl = "https://a.example"\nsecret-key-env = "NOT_SET_ANYWHERE"\n',
         "environment variable NOT_SET_ANYWHERE is not set"),
    ],
)  # fmt: skip
def test_what_several_endpoints_refuse(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        config_from(tmp_path, text)
    assert message in str(error.value)
    assert "run-key" not in str(error.value)


def test_matching_taggers_are_the_settings(tmp_path):
    text = (
        '[[endpoints]]\nurl = "https://a.example"\ntagger = "model"\nlang = "en"\n'
        '[[endpoints]]\nurl = "https://b.example"\ntagger = "model"\nlang = "en"\n'
    )
    config = config_from(tmp_path, text)
    assert config.settings().to_dict() == {"endpoint": "https://a.example", "tagger": "model", "lang": "en"}


def test_several_endpoints_and_max_requests_are_taken_with_cluster(tmp_path):
    """Both run on Dask (tests/test_cluster_endpoints.py): the settings are accepted."""
    flags = {"endpoint": ["https://a.example", "https://b.example"], "cluster": "local:2", "max_requests": 5}
    config = build_config({**BASE, **flags}, None, RUN_CREDS).load_secret_key()
    assert [spec.url for spec in config.endpoint_specs] == flags["endpoint"]
    assert config.cluster == "local:2" and config.max_requests == 5


def test_max_requests_must_be_positive():
    with pytest.raises(ConfigError, match="--max-requests must be at least 1"):
        build_config({**BASE, "max_requests": 0}, None, {})
