from __future__ import annotations

from pathlib import Path

import pytest

from gradmon import Config, GradmonError
from gradmon.config import load_config
from gradmon.tools.cli import main as cli_main


def test_defaults_match_design() -> None:
    c = load_config(environ={})
    assert c.collect.every_n_steps == 1
    assert c.collect.granularity == "parameter"
    assert c.collect.backend == "auto"
    assert c.exporter.addr == "127.0.0.1"
    assert c.exporter.port == 9400
    assert c.exporter.max_layers == 512
    assert c.tensorboard.logdir is None and c.record.path is None


def test_dict_yaml_and_config_object(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "collect:\n  every_n_steps: 5\n  include: '^encoder\\.'\nexporter:\n  port: 0\n"
    )
    from_file = load_config(path, environ={})
    assert from_file.collect.every_n_steps == 5
    assert from_file.collect.include == r"^encoder\."
    assert load_config(str(path), environ={}) == from_file
    assert load_config({"exporter": {"port": 0}}, environ={}).exporter.port == 0
    cfg = Config()
    assert load_config(cfg) is cfg


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path, environ={}) == Config()


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("exporter:\n  port: 9500\n")
    env = {
        "GRADMON_EXPORTER__PORT": "0",
        "GRADMON_EXPORTER__TLS__CERTFILE": "/x.pem",
        "GRADMON_COLLECT__INCLUDE": "[ab].*",  # must stay a string, not YAML
        "GRADMON_HEALTH__SPIKE_FACTOR": "5",
        "GRADMON_EXPORTER__ENABLED": "false",
        "GRADMON_RUN_ID": "ignored: no section",
    }
    c = load_config(path, environ=env)
    assert c.exporter.port == 0
    assert c.exporter.tls.certfile == "/x.pem"
    assert c.collect.include == "[ab].*"
    assert c.health.spike_factor == 5.0
    assert c.exporter.enabled is False


def test_environment_read_only_when_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADMON_COLLECT__EVERY_N_STEPS", "7")
    assert load_config().collect.every_n_steps == 7
    assert load_config({}).collect.every_n_steps == 7


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"colect": {}}, ["colect", "unknown key", "collect, exporter"]),
        ({"collect": {"granularty": "module"}}, ["collect.granularty", "granularity"]),
        ({"collect": {"granularity": "layer"}}, ["collect.granularity", "'parameter'", "'layer'"]),
        ({"collect": {"every_n_steps": 0}}, ["collect.every_n_steps", "greater than or equal"]),
        ({"collect": {"every_n_steps": "often"}}, ["collect.every_n_steps", "'often'"]),
        ({"collect": {"backend": "cuda"}}, ["collect.backend", "'triton'"]),
        ({"collect": {"update_ratio_every": -1}}, ["collect.update_ratio_every", "(got -1)"]),
        (
            {"collect": {"update_ratio_every": "sometimes"}},
            ["collect.update_ratio_every", "integer"],
        ),
        (
            {"collect": {"update_ratio_max_bytes": 0}},
            ["collect.update_ratio_max_bytes", "greater than 0"],
        ),
        ({"collect": {"update_ratio": 1}}, ["collect.update_ratio", "update_ratio_every"]),
        ({"collect": {"include": "("}}, ["collect.include", "regular expression"]),
        ({"exporter": {"port": 70000}}, ["exporter.port", "65535"]),
        ({"exporter": {"tls": {"cert": "x"}}}, ["exporter.tls.cert", "certfile"]),
        ({"health": {"spike_factor": 0.5}}, ["health.spike_factor", "greater than 1"]),
    ],
)
def test_errors_name_key_value_and_allowed(data: dict, needles: list[str]) -> None:
    with pytest.raises(GradmonError) as err:
        load_config(data, environ={})
    for needle in needles:
        assert needle in str(err.value)


def test_environment_errors_are_named() -> None:
    with pytest.raises(GradmonError, match="exporter.portt: unknown key"):
        load_config(environ={"GRADMON_EXPORTER__PORTT": "1"})
    with pytest.raises(GradmonError, match="GRADMON_EXPORTER__PORT__X"):
        load_config(environ={"GRADMON_EXPORTER__PORT": "1", "GRADMON_EXPORTER__PORT__X": "1"})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(GradmonError, match=r"cannot read gradmon config file .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("collect: [unclosed\n")
    with pytest.raises(GradmonError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad, environ={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(GradmonError, match="must hold a mapping"):
        load_config(listy, environ={})
    with pytest.raises(GradmonError, match=r"file .*wrong\.yaml"):
        (tmp_path / "wrong.yaml").write_text("exporter: {port: -1}\n")
        load_config(tmp_path / "wrong.yaml", environ={})


def test_wrong_config_type() -> None:
    with pytest.raises(GradmonError, match="not int"):
        load_config(42, environ={})  # type: ignore[arg-type]


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("health:\n  patience: 5\n")
    assert cli_main(["config", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "patience: 5" in out and "every_n_steps: 1" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("health:\n  patiense: 5\n")
    assert cli_main(["config", "check", str(bad)]) == 2
    assert "health.patiense: unknown key" in capsys.readouterr().err
