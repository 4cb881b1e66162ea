"""Property tests: whatever TOML or values arrive, the loader reports file and key, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenbackup import config
from xenbackup.config import ConfigError

PATH = "/etc/xenbackup/xenbackup.toml"
KEYS = ["url", "password_file", "snapshot_size", "mode", "lv", "path", "disks", "hypervisor", "keep_last",
        "mount_options", "max_parallel", "schedule", "bogus", "compression", "domain_config", "extend_step"]
scalars = st.one_of(st.integers(-10**12, 10**12), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=20), st.sampled_from(["1G", "20%ORIGIN", "files", "block", "system/xenvm",
                                                           "/abs", "../up", "xen", "kvm", "auto"]))


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise AssertionError(v)


values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)), max_leaves=8)
tables = st.dictionaries(st.sampled_from(KEYS), values, max_size=5)
disk_tables = st.lists(st.dictionaries(st.sampled_from(["lv", "mode", "path", "mount_options", "bogus"]), values,
                                       max_size=4), max_size=3)
vm_tables = st.dictionaries(st.sampled_from(KEYS), values, max_size=4).flatmap(
    lambda t: st.builds(lambda d: {**t, "disks": d}, st.one_of(disk_tables, values)))
documents = st.fixed_dictionaries({}, optional={
    "repository": tables, "defaults": tables, "settings": tables, "commands": tables,
    "vm": st.one_of(st.dictionaries(st.text(min_size=1, max_size=8), vm_tables, max_size=3), values),
    "junk": tables,
})


def render(doc: dict[str, object]) -> str:
    return "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items())


def check(text: str | bytes) -> None:
    try:
        config.parse(text, PATH)
    except ConfigError as exc:
        assert exc.errors
        for line in exc.errors:
            assert line.startswith(f"{PATH}: "), line
            assert line.split(": ", 2)[1], line  # a key (or "(syntax)") follows the file


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_structured_random_configs_never_raise_anything_else(doc: dict[str, object]) -> None:
    check(render(doc))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    check(data)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='[]="{}.,\n #abc1%GvmdisklvO/', max_size=120))
def test_toml_like_noise_never_raises_anything_else(text: str) -> None:
    check(text)


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "packaging" / "xenbackup.toml.example"
    cfg = config.parse(example.read_bytes(), str(example))
    assert "vm1" in cfg.vms
