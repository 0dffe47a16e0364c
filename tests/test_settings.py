"""The settings object: defaults, TOML, environment, validation, freezing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stockade.errors import ConfigError
from stockade.settings import load


def test_defaults_are_safe() -> None:
    s = load(environ={})
    assert (s.dicom_host, s.dicom_port, s.dicom_ae_title) == ("127.0.0.1", 11112, "STOCKADE")
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.data_dir == Path("./stockade-data")
    assert s.index_url.startswith("sqlite:///") and s.index_url.endswith("index.sqlite3")
    assert s.dicom_on_loopback and not s.allow_replace


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "stockade.toml"
    cfg.write_text('dicom_port = 2000\ndicom_ae_title = "FROMFILE"\nallow_replace = true\n')
    s = load(
        cfg,
        environ={
            "STOCKADE_DICOM_PORT": "3000",
            "STOCKADE_DATA_DIR": "/srv/x",
            "STOCKADE_DATABASE_URL": "postgresql+psycopg://u@h/db",
            "STOCKADE_DICOM_HOST": "0.0.0.0",
            "STOCKADE_HTTP_PORT": "9090",
            "STOCKADE_HTTP_HOST": "::1",
        },
    )
    assert s.dicom_port == 3000 and s.dicom_ae_title == "FROMFILE" and s.allow_replace
    assert s.data_dir == Path("/srv/x") and s.index_url == "postgresql+psycopg://u@h/db"
    assert not s.dicom_on_loopback and s.http_port == 9090 and s.http_host == "::1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dicom_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STOCKADE_DICOM_PORT": "70000"}, "dicom_port"),
        ({"STOCKADE_DICOM_PORT": "abc"}, "not a int"),
        ({"STOCKADE_DICOM_AE_TITLE": "A" * 17}, "1 to 16"),
        ({"STOCKADE_DICOM_AE_TITLE": "BAD\\AE"}, "backslash"),
        ({"STOCKADE_MAX_PDU_SIZE": "100"}, "max_pdu_size"),
        ({"STOCKADE_ALLOW_REPLACE": "maybe"}, "not a bool"),
        ({"STOCKADE_DICOM_PRT": "11112"}, "unknown environment setting"),
    ],
)
def test_bad_values_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(environ=env)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text("dicom_prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'dicom_prot'"):
        load(cfg, environ={})


def test_printed_settings_hide_the_database_password() -> None:
    from stockade.settings import load

    secret = "pw-" + "x7" * 8
    settings = load(
        environ={}, overrides={"database_url": f"postgresql+psycopg://stockade:{secret}@db/pacs"}
    )
    shown = settings.as_dict()["database_url"]
    assert secret not in shown and shown == "postgresql+psycopg://stockade:***@db/pacs"
    assert settings.database_url.endswith(f"{secret}@db/pacs")  # the value itself is intact
