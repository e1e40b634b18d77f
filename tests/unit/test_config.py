"""config.py: presets < TOML file < environment < overrides, deep-merged per nested field; every
invalid value is a ConfigError with one clear line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mlfabric.config import (
    PRESETS,
    FailureConfig,
    OverlayConfig,
    Settings,
    TransportConfig,
    load_settings,
    parse_address,
)
from mlfabric.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MLFABRIC_* variable from the developer's shell leaks in; relative paths land in tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith("MLFABRIC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_toml(tmp_path: Path, text: str, name: str = "mlfabric.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(**kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kw)
    text = str(info.value)
    assert "\n" not in text, f"ConfigError must be one line: {text!r}"
    assert not isinstance(info.value, ValidationError)
    return text


# --------------------------------------------------------------------------------------------------
# Defaults and presets
# --------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings()
    assert s == Settings()
    assert s.listen == "127.0.0.1:7700"
    assert s.seeds == []
    assert s.overlay == OverlayConfig()
    assert s.transport == TransportConfig()
    assert s.key_bytes() is None


def test_lan_preset_is_the_defaults() -> None:
    assert load_settings(preset="lan") == Settings()


def test_presets_order_the_timers() -> None:
    local, lan, wan = (load_settings(preset=p).overlay for p in ("local", "lan", "wan"))
    for name in ("stabilize_interval", "fix_fingers_interval", "check_predecessor_interval", "rpc_timeout"):
        assert getattr(local, name) < getattr(lan, name) < getattr(wan, name), name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid_and_only_change_what_they_name(preset: str) -> None:
    s = load_settings(preset=preset)
    for section, values in PRESETS[preset].items():
        model = getattr(s, section)
        for name, field in type(model).model_fields.items():
            want = values.get(name, field.default)
            assert getattr(model, name) == want, f"{preset}: {section}.{name}"


def test_preset_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFABRIC_PRESET", "local")
    assert load_settings().overlay == load_settings(preset="local").overlay
    assert load_settings(preset="wan").overlay.stabilize_interval == 3.0  # the argument wins


def test_unknown_preset() -> None:
    text = config_error(preset="galactic")
    assert "galactic" in text and "local" in text


def test_loading_does_not_mutate_presets(tmp_path: Path) -> None:
    before = repr(PRESETS)
    load_settings(write_toml(tmp_path, "[overlay]\nsuccessors = 3\n"), preset="local", overlay={"rpc_timeout": 0.3})
    assert repr(PRESETS) == before


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def test_env_overrides_a_nested_field_and_keeps_its_siblings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFABRIC_OVERLAY__STABILIZE_INTERVAL", "0.5")
    s = load_settings(preset="local")
    assert s.overlay.stabilize_interval == 0.5
    # siblings still come from the preset, not from the defaults: a deep merge
    assert s.overlay.fix_fingers_interval == PRESETS["local"]["overlay"]["fix_fingers_interval"]
    assert s.transport.connect_timeout == PRESETS["local"]["transport"]["connect_timeout"]


def test_env_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("mlfabric_overlay__successors", "12")
    assert load_settings().overlay.successors == 12


def test_env_top_level_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFABRIC_LISTEN", "0.0.0.0:9000")
    monkeypatch.setenv("MLFABRIC_SEEDS", '["10.0.0.1:7700", "[::1]:7700"]')
    monkeypatch.setenv("MLFABRIC_LOG_LEVEL", "debug")
    s = load_settings()
    assert s.listen == "0.0.0.0:9000"
    assert s.seeds == ["10.0.0.1:7700", "[::1]:7700"]
    assert s.log_level == "debug"


def test_env_nested_json_section_merges_with_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFABRIC_TRANSPORT", '{"max_frame": 4096}')
    s = load_settings(preset="local")
    assert s.transport.max_frame == 4096
    assert s.transport.connect_timeout == PRESETS["local"]["transport"]["connect_timeout"]


# --------------------------------------------------------------------------------------------------
# TOML file and the full precedence chain
# --------------------------------------------------------------------------------------------------


def test_toml_file_layers_over_the_preset(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
listen = "0.0.0.0:7800"
seeds = ["10.1.0.1:7700"]
data_dir = "/var/lib/mlfabric"

[overlay]
successors = 16

[transport]
max_frame = 65536
""",
    )
    s = load_settings(path, preset="local")
    assert s.listen == "0.0.0.0:7800"
    assert s.seeds == ["10.1.0.1:7700"]
    assert s.data_dir == Path("/var/lib/mlfabric")
    assert s.overlay.successors == 16
    assert s.overlay.stabilize_interval == PRESETS["local"]["overlay"]["stabilize_interval"]
    assert s.transport.max_frame == 65536
    assert s.transport.connect_timeout == PRESETS["local"]["transport"]["connect_timeout"]


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFABRIC_CONFIG", str(write_toml(tmp_path, "[overlay]\nsuccessors = 5\n")))
    assert load_settings().overlay.successors == 5


@pytest.mark.parametrize("levels", [("preset",), ("preset", "file"), ("preset", "file", "env"),
                                    ("preset", "file", "env", "override"), ("file", "override"),
                                    ("env", "file"), ("override", "preset")])  # fmt: skip
def test_precedence(levels: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One field set at several levels: the highest present wins (override > env > file > preset)."""
    value = {"preset": 0.1, "file": 0.2, "env": 0.3, "override": 0.4}  # preset=local sets 0.1
    path = None
    if "file" in levels:
        path = write_toml(tmp_path, "[overlay]\nstabilize_interval = 0.2\n")
    if "env" in levels:
        monkeypatch.setenv("MLFABRIC_OVERLAY__STABILIZE_INTERVAL", "0.3")
    kw: dict[str, Any] = {"overlay": {"stabilize_interval": 0.4}} if "override" in levels else {}
    s = load_settings(path, preset="local" if "preset" in levels else "lan", **kw)
    winner = max(levels, key=["preset", "file", "env", "override"].index)
    assert s.overlay.stabilize_interval == value[winner]
    if "preset" in levels:  # the rest of the section is still the preset's
        assert s.overlay.fix_fingers_interval == PRESETS["local"]["overlay"]["fix_fingers_interval"]


def test_none_overrides_are_ignored() -> None:
    """CLI flags left unset arrive as None and must not erase lower layers."""
    assert load_settings(preset="local", listen=None, seeds=None).listen == "127.0.0.1:7700"


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.listen = "127.0.0.1:1"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.overlay.successors = 2  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Invalid configuration: ConfigError, one line, naming the field
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"listen": "nope"}, "listen"),
        ({"listen": "host:99999"}, "listen"),
        ({"listen": "host:²"}, "listen"),
        ({"advertise": "host:0"}, "advertise"),
        ({"seeds": ["ok:1", "bad"]}, "seeds"),
        ({"control": "x"}, "control"),
        ({"log_level": "verbose"}, "log_level"),
        ({"log_format": "xml"}, "log_format"),
        ({"cluster_key": ""}, "cluster_key"),
        ({"bogus": 1}, "bogus"),
        ({"overlay": {"successors": 0}}, "overlay.successors"),
        ({"overlay": {"successors": 65}}, "overlay.successors"),
        ({"overlay": {"stabilize_interval": 0}}, "overlay.stabilize_interval"),
        ({"overlay": {"stabilize_interval": -1.0}}, "overlay.stabilize_interval"),
        ({"overlay": {"stabilize_interval": "soon"}}, "overlay.stabilize_interval"),
        ({"overlay": {"unknown_knob": 1}}, "overlay.unknown_knob"),
        ({"overlay": {"rpc_timeout": 20.0, "stabilize_interval": 1.0}}, "rpc_timeout"),
        ({"transport": {"max_frame": 10}}, "transport.max_frame"),
        ({"transport": {"max_connections": 1}}, "transport.max_connections"),
        ({"overlay": "fast"}, "overlay"),
    ],
)
def test_invalid_value_is_one_clear_line(overrides: dict[str, Any], field: str) -> None:
    text = config_error(**overrides)
    assert text.startswith("invalid configuration: ")
    assert field in text


def test_several_errors_are_reported_together() -> None:
    text = config_error(listen="nope", overlay={"successors": 0})
    assert "listen" in text and "overlay.successors" in text


def test_invalid_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFABRIC_OVERLAY__STABILIZE_INTERVAL", "fast")
    assert "overlay.stabilize_interval" in config_error()


def test_unknown_nested_env_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFABRIC_OVERLAY__STABILISE_INTERVAL", "0.5")  # British spelling: a typo here
    assert "overlay.stabilise_interval" in config_error()


def test_invalid_value_in_file(tmp_path: Path) -> None:
    assert "overlay.successors" in config_error(config_file=write_toml(tmp_path, "[overlay]\nsuccessors = -3\n"))


def test_unknown_key_in_file(tmp_path: Path) -> None:
    assert "lisen" in config_error(config_file=write_toml(tmp_path, 'lisen = "127.0.0.1:1"\n'))


def test_file_that_is_not_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[overlay\nsuccessors = \n")
    text = config_error(config_file=path)
    assert str(path) in text and "TOML" in text


def test_missing_file(tmp_path: Path) -> None:
    assert "cannot read config file" in config_error(config_file=tmp_path / "absent.toml")


def test_directory_as_file(tmp_path: Path) -> None:
    assert "cannot read config file" in config_error(config_file=tmp_path)


# --------------------------------------------------------------------------------------------------
# Cluster key
# --------------------------------------------------------------------------------------------------


def test_cluster_key_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(cluster_key="s3cret").key_bytes() == b"s3cret"
    monkeypatch.setenv("MLFABRIC_CLUSTER_KEY", "from-env")
    assert load_settings().key_bytes() == b"from-env"


def test_cluster_key_file_first_line_stripped(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("  k3y-material  \nsecond line is ignored\n")
    assert load_settings(cluster_key_file=key).key_bytes() == b"k3y-material"


def test_cluster_key_file_from_toml(tmp_path: Path) -> None:
    (tmp_path / "cluster.key").write_text("abc\n")
    path = write_toml(tmp_path, f'cluster_key_file = "{tmp_path / "cluster.key"}"\n')
    assert load_settings(path).key_bytes() == b"abc"


@pytest.mark.parametrize("content", ["", "\n", "   \nkey-on-line-two\n"])
def test_empty_cluster_key_file(tmp_path: Path, content: str) -> None:
    key = tmp_path / "cluster.key"
    key.write_text(content)
    with pytest.raises(ConfigError, match="empty"):
        load_settings(cluster_key_file=key).key_bytes()


def test_unreadable_cluster_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read cluster_key_file") as info:
        load_settings(cluster_key_file=tmp_path / "absent.key").key_bytes()
    assert "\n" not in str(info.value)


def test_empty_cluster_key_in_env_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty key would turn authentication on with a key everybody knows."""
    monkeypatch.setenv("MLFABRIC_CLUSTER_KEY", "")
    assert "cluster_key" in config_error()


# --------------------------------------------------------------------------------------------------
# Addresses and documentation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "allow_zero", "expected"),
    [
        ("127.0.0.1:7700", False, ("127.0.0.1", 7700)),
        ("node-a.example:1", False, ("node-a.example", 1)),
        ("[::1]:65535", False, ("::1", 65535)),
        ("0.0.0.0:0", True, ("0.0.0.0", 0)),
    ],
)
def test_parse_address(text: str, allow_zero: bool, expected: tuple[str, int]) -> None:
    assert parse_address(text, allow_zero=allow_zero) == expected


@pytest.mark.parametrize(
    "text", ["", "host", ":7700", "host:", "host:0", "host:65536", "host:-1", "host:http", "host:²", "host:١٢"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="address"):
        parse_address(text)


@pytest.mark.parametrize(
    "model", [Settings, OverlayConfig, FailureConfig, TransportConfig], ids=lambda m: m.__name__
)
def test_every_setting_is_documented(model: type) -> None:
    missing = [name for name, field in model.model_fields.items() if not field.description]
    assert not missing, f"{model.__name__} fields without description=: {missing}"


def test_readme_example_is_valid(tmp_path: Path) -> None:
    readme = Path(__file__).resolve().parents[2] / "README.md"
    if not readme.exists():
        pytest.skip("no README.md")
    blocks = readme.read_text().split("```toml")[1:]
    assert blocks, "README.md has no TOML example"
    for block in blocks:
        s = load_settings(write_toml(tmp_path, block.split("```")[0]))
        assert s.seeds and s.overlay.successors >= 1
