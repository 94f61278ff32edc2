"""Settings: flags > environment > --config TOML > defaults, and the shipped example configs."""

from pathlib import Path

import pytest

from batchtag.config import ConfigError, RunConfig, build_config

BASE = {"sources": ["photos"], "out": "out.jsonl"}
CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_layers_in_order(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'endpoint = "http://file.test"\nappid = "from-file"\nsecret-id = "file"\nconcurrency = 3\n'
    )
    env = {"BATCHTAG_APPID": "from-env", "BATCHTAG_SECRET_KEY": "env-key"}
    config = build_config({**BASE, "appid": None, "secret_id": "flag"}, str(toml), env)
    assert (config.endpoint, config.appid, config.secret_id, config.secret_key, config.concurrency) == (
        "http://file.test",
        "from-env",
        "flag",
        "env-key",
        3,
    )


def test_defaults_are_the_embedded_tagger():
    config = build_config(BASE, None, {})
    assert config.is_local and config.tagger == "model" and config.qps is None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path, monkeypatch):
    env = {"BATCHTAG_APPID": "1", "BATCHTAG_SECRET_ID": "id", "BATCHTAG_SECRET_KEY": "key"}
    monkeypatch.setenv("TEAM_A_SECRET_KEY", "a")  # configs/two-appids.toml
    monkeypatch.setenv("TEAM_B_SECRET_KEY", "b")
    config = build_config(BASE, str(path), env)
    assert config.concurrency >= 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("concurency = 3", "unknown setting"),
        ("qps = [", "not valid TOML"),
        ("retries = 'many'", "setting 'retries' must be a whole number"),
        ("progress = 'many'", "setting 'progress' must be true or false"),
        ("secret-id = ['many']", "setting 'secret-id' must be a string"),
    ],
)
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        build_config(BASE, str(toml), {})
    assert "many" not in str(error.value)  # the setting and the file are named, never the value
    assert str(toml) in str(error.value)


def test_secret_key_is_not_in_the_config_repr():
    config = build_config({**BASE, "secret_key": "s3cr3t-value"}, None, {})
    assert "s3cr3t-value" not in repr(config)


def test_settings_in_records_name_the_endpoint_without_credentials_or_query():
    remote = build_config(
        {
            **BASE,
            "endpoint": "https://Service.Example:8443/base/?token=t#x",  # (userinfo is refused)
            "appid": "1",
            "secret_id": "a",
            "secret_key": "b",
        },
        None,
        {},
    )
    assert remote.settings().to_dict() == {"endpoint": "https://service.example:8443/base"}
    local = build_config({**BASE, "lang": "en", "tagger": "color"}, None, {})
    assert local.settings().to_dict() == {"endpoint": "local", "tagger": "color", "lang": "en"}


def test_validate_reads_no_file_the_secret_key_is_loaded_after_it(tmp_path):
    missing = str(tmp_path / "no-such-key")
    config = RunConfig(["photos"], "out.jsonl", endpoint="https://api.test", appid="1", secret_id="s")
    config.secret_key_file = missing
    assert config.validate() is config and config.secret_key == ""  # a key file counts; not read yet
    with pytest.raises(ConfigError, match="--secret-key-file"):
        config.load_secret_key()
    key_file = tmp_path / "key"
    key_file.write_text("sekrit\n")
    key_file.chmod(0o600)
    config.secret_key_file = str(key_file)
    assert config.load_secret_key().secret_key == "sekrit"
