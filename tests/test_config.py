"""Configuration: presets, files and overrides merge in order; every bad value is named."""

import pytest

from qsc.config import PRESETS, parse_overrides, resolve_config
from qsc.errors import ConfigError


def test_presets_set_bits():
    for name in PRESETS:
        cfg = resolve_config(name)
        assert f"w{cfg.w_bits}a{cfg.a_bits}" == name.partition("-")[0]


def test_file_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "w4a8"\ngroup_size = 64\nsmooth_quant = false\n')
    cfg = resolve_config(None, toml, parse_overrides(["group_size=128"]))
    assert (cfg.w_bits, cfg.a_bits, cfg.group_size, cfg.smooth_quant) == (4, 8, 128, False)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("a_bits: 6\ninclude: ['^blocks\\.0\\.']\n")
    cfg = resolve_config("w4a8", yaml)
    assert cfg.a_bits == 6 and cfg.include == ("^blocks\\.0\\.",)


@pytest.mark.parametrize("pairs, message", [
    (["w_bits=5"], "bit width 5"),
    (["a_bits=7"], "activation bit width 7"),
    (["group_size=-1"], "group_size"),
    (["smooth_quant=maybe"], "smooth_quant"),
    (["smooth_alpha=1.5"], "smooth_alpha must be 'auto' or a number in \\[0, 1\\], got 1.5"),
    (["smooth_alpha=often"], "smooth_alpha .* got 'often'"),
    (["calib_samples=many"], "calib_samples"),
    (["bits=4"], "unknown setting 'bits'"),
    (["backend=cuda"], "unknown backend"),
    (["a_bits"], "KEY=VALUE"),
    (["density=0"], "density must be in \\(0, 1\\]"),
    (["ssar_tau=5"], "ssar_tau > 0 corrects sparse attention: set density below 1"),
    (["density=0.2", "ssar_rank=-1"], "must be >= 0"),
    (["density=0.2", "dense_steps=2"], "dense_steps runs the first steps on SSAR's dense refresh program"),
    (["ssar_extrapolation=quadratic"], "ssar_extrapolation must be one of"),
])
def test_bad_values_are_named(pairs, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("w8a8", overrides=parse_overrides(pairs))


def test_smooth_alpha_is_a_number_or_auto():
    assert resolve_config("w4a8").smooth_alpha == "auto"
    assert resolve_config("w4a8", overrides=parse_overrides(["smooth_alpha=0.35"])).smooth_alpha == 0.35
    for bad in (True, None, -0.1):
        with pytest.raises(ConfigError, match="smooth_alpha"):
            resolve_config("w4a8", overrides={"smooth_alpha": bad})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(None, tmp_path / "missing.toml")
    broken = tmp_path / "b.toml"
    broken.write_text("w_bits = = 4")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config(None, broken)
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("w3a3")
