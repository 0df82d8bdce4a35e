"""Bad input always gets a clear answer: GradmonError naming the key or argument, and no
other exception type ever escapes (property-based, hypothesis). Layer names with quotes,
backslashes and non-ASCII characters come out correctly escaped in /metrics."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradmon
from gradmon import GradmonError
from gradmon.config import Config, load_config

NO_SERVER = {"exporter": {"enabled": False}}
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --------------------------------------------------------------------- configs
SECTIONS: dict[str, list[str]] = {
    name: list(field.annotation.model_fields)  # type: ignore[union-attr]
    for name, field in Config.model_fields.items()
    if name != "run_id"
}
SECTIONS["exporter.tls"] = ["certfile", "keyfile", "client_cafile"]
SECTIONS["exporter.basic_auth"] = ["username", "password_file"]

BAD_REGEXES = ["(", "[a-", "*x", "(?P<n>a)(?P<n>b)", "a{2,1}", "\\", "(?<!a+)b"]
LITERALS = ["parameter", "module", "depth", "auto", "torch", "cpu", "triton", "first", "all"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(BAD_REGEXES + LITERALS + ["0", "1e-6", "true", "-1", "nan", "inf"]),
    st.binary(max_size=4),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=6), inner, max_size=3),
    ),
    max_leaves=6,
)


@st.composite
def section(draw: st.DrawFn, name: str) -> dict[str, Any]:
    known = SECTIONS[name]
    keys = draw(st.lists(st.sampled_from(known), max_size=len(known), unique=True))
    out: dict[Any, Any] = {k: draw(values) for k in keys}
    if name == "exporter" and draw(st.booleans()):
        out["tls"] = draw(section("exporter.tls"))
    if name == "exporter" and draw(st.booleans()):
        out["basic_auth"] = draw(section("exporter.basic_auth"))
    if draw(st.integers(0, 4)) == 0:  # an unknown key now and then
        out[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return out


@st.composite
def configs(draw: st.DrawFn) -> dict[Any, Any]:
    names = draw(
        st.lists(
            st.sampled_from(sorted(n for n in SECTIONS if "." not in n)), unique=True, max_size=4
        )
    )
    data: dict[Any, Any] = {}
    for n in names:
        # mostly a proper section, sometimes a wrong type where a section belongs
        data[n] = draw(st.one_of(section(n), section(n), section(n), scalars))
    if draw(st.booleans()):
        data["run_id"] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        data[draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))] = draw(values)
    return data


def _resolves(data: Any, path: str) -> bool:
    """Whether a dotted key path from an error message leads into the input data (or
    to a key one level below it, for a value that should have been a section)."""
    node = data
    for part in _split_path(path):
        if isinstance(node, Mapping):
            matches = [k for k in node if str(k) == part]
            if not matches:
                return False
            node = node[matches[0]]
        elif isinstance(node, list) and part.isdigit():
            if int(part) >= len(node):
                return False
            node = node[int(part)]
        else:
            return True  # the parent was not a section: the error is about it
    return True


_PART = r'(?:"(?:[^"\\]|\\.)*"|[^".\s:]+)'


def _error_paths(message: str) -> list[str]:
    return re.findall(rf"^  ({_PART}(?:\.{_PART})*): ", message, flags=re.MULTILINE)


def _split_path(path: str) -> list[str]:
    """Key parts of a path from an error message; JSON-quoted parts unquoted."""
    parts = re.findall(_PART, path)
    return [json.loads(p) if p.startswith('"') else p for p in parts]


@PROPERTY
@given(configs())
def test_random_configs_are_validated_or_named(data: dict[Any, Any]) -> None:
    try:
        cfg = load_config(data, environ={})
    except GradmonError as exc:
        message = str(exc)
        paths = _error_paths(message)
        assert message.startswith("invalid gradmon config"), message
        assert paths, message
        for path in paths:
            assert path == "<root>" or _resolves(data, path), (path, message)
        return
    assert isinstance(cfg, Config)
    # What was accepted is what was asked for, validated.
    assert cfg.collect.every_n_steps >= 1
    assert 0 <= cfg.exporter.port <= 65535
    for regex in (cfg.collect.include, cfg.collect.exclude):
        if regex is not None:
            re.compile(regex)


@PROPERTY
@given(values)
def test_any_value_anywhere_only_gradmon_error(value: Any) -> None:
    """Any value, at the top level or in every field of every section."""
    for candidate in _placements(value):
        with contextlib.suppress(GradmonError):
            load_config(candidate, environ={})


def _placements(value: Any) -> list[Any]:
    out: list[Any] = [value, {"run_id": value}]
    for name, keys in SECTIONS.items():
        top, _, sub = name.partition(".")
        for key in keys:
            out.append({top: {sub: {key: value}}} if sub else {top: {key: value}})
        out.append({top: value})
    return out


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"collect": {"include": "("}}, "collect.include"),
        ({"collect": {"exclude": "[a-"}}, "collect.exclude"),
        ({"exporter": {"port": 70000}}, "exporter.port"),
        ({"exporter": {"port": "http"}}, "exporter.port"),
        ({"exporter": {"tls": {"certfile": 3, "nope": 1}}}, "exporter.tls.nope"),
        ({"health": {"spike_factor": 0.5}}, "health.spike_factor"),
        ({"health": {"vanishing_ratio": math.nan}}, "health.vanishing_ratio"),
        ({"collect": {"granularity": "layer"}}, "collect.granularity"),
        ({"colect": {}}, "colect"),
        ({"collect": 5}, "collect"),
        ({"record": {"every": 0}}, "record.every"),
        ({1: 2}, "1"),
    ],
)
def test_error_names_the_key_and_value(data: dict[Any, Any], path: str) -> None:
    with pytest.raises(GradmonError) as info:
        load_config(data, environ={})
    assert f"  {path}: " in str(info.value)


@PROPERTY
@given(
    st.dictionaries(
        st.from_regex(r"GRADMON_[A-Za-z_]{0,20}(__[A-Za-z_]{0,10}){0,3}", fullmatch=True),
        st.text(max_size=10).filter(lambda s: "\x00" not in s),
        max_size=4,
    )
)
def test_environment_overrides_only_gradmon_error(environ: dict[str, str]) -> None:
    try:
        load_config({}, environ=environ)
    except GradmonError as exc:
        assert "GRADMON_" in str(exc) or "invalid gradmon config" in str(exc)


# ------------------------------------------------------------------ API misuse
def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))


odd = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(object()),
    st.just(torch.zeros(3)),
    st.just(torch.zeros(())),
    st.just(nn.Linear(1, 1)),
    st.just(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)),
)


@PROPERTY
@given(model=odd, optimizer=odd, scaler=odd)
def test_attach_argument_misuse_only_gradmon_error(model: Any, optimizer: Any, scaler: Any) -> None:
    try:
        mon = gradmon.attach(
            model, optimizer, scaler=scaler, config=NO_SERVER, registry=CollectorRegistry()
        )
    except GradmonError as exc:
        assert re.search(r"attach\(|config", str(exc)), str(exc)
    else:
        mon.close()


@PROPERTY
@given(config=odd)
def test_attach_config_misuse_only_gradmon_error(config: Any) -> None:
    try:
        mon = gradmon.attach(_net(), None, config=config, registry=CollectorRegistry())
    except GradmonError:
        return
    mon.close()


@pytest.fixture(scope="module")
def monitor() -> Any:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = gradmon.attach(net, opt, config=NO_SERVER, registry=CollectorRegistry())
    yield net, mon
    mon.close()


@PROPERTY
@given(step=odd, skipped=odd)
def test_collect_misuse_only_gradmon_error(monitor: Any, step: Any, skipped: Any) -> None:
    _, mon = monitor
    try:
        mon.collect(step=step, skipped=skipped)
    except GradmonError as exc:
        assert "collect(" in str(exc)


@PROPERTY
@given(st.dictionaries(st.text(min_size=1, max_size=8), odd, max_size=4))
def test_log_misuse_only_gradmon_error(monitor: Any, scalars: dict[str, Any]) -> None:
    _, mon = monitor
    try:
        mon.log(**scalars)
    except GradmonError as exc:
        assert any(f"log({name}=" in str(exc) for name in scalars), str(exc)
    # whatever was accepted can be scraped
    generate_latest(mon.registry)


def test_collect_on_closed_monitor_is_a_gradmon_error() -> None:
    mon = gradmon.attach(_net(), None, config=NO_SERVER, registry=CollectorRegistry())
    mon.close()
    with pytest.raises(GradmonError, match="closed"):
        mon.collect()


# ------------------------------------------------------------ label escaping
# torch forbids only '.' and the empty string in module names (and existing attributes).
layer_names = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="."),
    min_size=1,
    max_size=12,
).filter(lambda s: not hasattr(nn.Module(), s))

FIXED_NAMES = ['çà"x\\\\y', 'quote"d', "back\\slash", "\\n", "ünï cödé ☃ 层", '"\\"']


def _scraped_layers(names: list[str]) -> dict[str, set[str]]:
    model = nn.Module()
    for name in names:
        model.add_module(name, nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    registry = CollectorRegistry()
    with gradmon.attach(model, opt, config=NO_SERVER, registry=registry):
        x = torch.randn(3, 2)
        loss = sum(model.get_submodule(n)(x).sum() for n in names)
        assert isinstance(loss, torch.Tensor)
        torch.autograd.backward(loss)
        opt.step()
        text = generate_latest(registry).decode("utf-8")
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "layer" in sample.labels:
                found.setdefault(family.name, set()).add(sample.labels["layer"])
    return found


def test_fixed_odd_layer_names_round_trip() -> None:
    found = _scraped_layers(FIXED_NAMES)
    want = {f"{n}.{p}" for n in FIXED_NAMES for p in ("weight", "bias")}
    assert found["gradmon_grad_norm"] == want
    assert found["gradmon_grad_rms"] == want


@settings(max_examples=25, deadline=None)
@given(st.lists(layer_names, min_size=1, max_size=3, unique=True))
def test_random_layer_names_round_trip(names: list[str]) -> None:
    found = _scraped_layers(names)
    assert found["gradmon_grad_norm"] == {f"{n}.{p}" for n in names for p in ("weight", "bias")}


# ------------------------------------------------------------ config files
# Regression tests: read_yaml once caught OSError only, so these escaped as ValueError and
# UnicodeDecodeError.
def test_path_with_nul_byte_is_a_gradmon_error() -> None:
    with pytest.raises(GradmonError, match="config"):
        load_config("gradmon\x00.yaml", environ={})


def test_non_utf8_file_is_a_gradmon_error(tmp_path: Any) -> None:
    path = tmp_path / "gradmon.yaml"
    path.write_bytes(b"\xff\xfe\x00collect: {}")
    with pytest.raises(GradmonError, match="gradmon.yaml"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    "text",
    ["[1, 2]", "collect: [", "!!python/object:os.system {}", "collect:\n  every_n_steps: 0"],
)
def test_bad_yaml_files_are_gradmon_errors(tmp_path: Any, text: str) -> None:
    path = tmp_path / "gradmon.yaml"
    path.write_text(text)
    with pytest.raises(GradmonError, match="gradmon"):
        load_config(path, environ={})
    with pytest.raises(GradmonError):
        load_config(tmp_path / "missing.yaml", environ={})


@pytest.mark.parametrize("data", [{".": None}, {"collect": {"a.b": 1}}, {"": 1}])
def test_keys_with_dots_or_empty_are_quoted_in_errors(data: dict[str, Any]) -> None:
    """Regression: hypothesis found {'.': None} reported as the ambiguous path `.`."""
    with pytest.raises(GradmonError) as err:
        load_config(data, environ={})
    paths = _error_paths(str(err.value))
    assert paths and all(_resolves(data, p) for p in paths), str(err.value)
