"""Config: typed, frozen, overrides as TOML values, unknown keys rejected."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from cdmpi import catalog, config
from cdmpi.errors import CdmpiError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = config.from_dict({"optim": {"lr": 1}}, ["optim.lr=0.003", "data.dataset=a9a", "run.steps=7",
                                                   'compress.name="topk"'])
    assert cfg.optim.lr == 0.003 and isinstance(cfg.optim.lr, float)
    assert cfg.data.dataset == "a9a" and cfg.run.steps == 7 and cfg.compress.name == "topk"
    assert config.from_dict({"optim": {"lr": 1}}).optim.lr == 1.0  # ints are accepted for floats


def test_frozen():
    cfg = config.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.steps = 3
    assert config.replace(cfg, "run", steps=3).run.steps == 3 and cfg.run.steps != 3


@pytest.mark.parametrize("values, message", [
    ({"optim": {"lrr": 1}}, "unknown key optim.lrr"),
    ({"nonsense": {}}, "unknown key nonsense"),
    ({"run": {"steps": 1.5}}, "run.steps must be int"),
    ({"run": {"steps": True}}, "run.steps must be int"),
    ({"optim": {"lr": "fast"}}, "optim.lr must be float"),
    ({"run": 3}, "[run] must be a table"),
    ({"optim": {"beta1": 1.0}}, "optim.beta1 must be in [0, 1)"),
    ({"run": {"workers": 0}}, "run.workers must be > 0"),
])
def test_rejections_name_the_key(values, message):
    with pytest.raises(CdmpiError) as err:
        config.from_dict(values)
    assert message in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(CdmpiError, match="key=value"):
        config.from_dict({}, ["optim.lr"])


def test_invalid_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[run\nsteps = 1")
    with pytest.raises(CdmpiError, match="not valid TOML"):
        config.load(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    """Every shipped config loads, and each value it writes is the value the run gets."""
    written = tomllib.loads(path.read_text())
    loaded = config.load(path).to_dict()
    for section, table in written.items():
        for key, value in table.items():
            assert loaded[section][key] == value, f"{path.name}: {section}.{key}"


def test_logreg_configs_follow_the_paper():
    for name in ("phishing", "mushrooms", "a9a", "w8a"):
        cfg = config.load(REPO / "configs" / "logreg" / f"{name}.toml")
        assert cfg.run.workers == 20 and cfg.optim.algorithm == "cdadam"
        # cdadam's own compressor, which the other algorithms do not inherit (compress.name = "auto")
        assert cfg.compress.name == "auto" and catalog.compressor_for("cdadam", "auto") == "scaled_sign"
        assert (cfg.optim.beta1, cfg.optim.beta2) == (0.9, 0.99)
        assert round(cfg.optim.lr, 6) in (0.001, 0.003, 0.005, 0.007, 0.009)
        assert cfg.data.dataset == name and cfg.problem.reg == 0.1


def test_digest_changes_with_values():
    assert config.Config().digest() != config.from_dict({"optim": {"lr": 0.1}}).digest()


@pytest.mark.parametrize("override,fragment", [
    ("run.threads=100000", "run.threads must be at most"),
    ("run.seed=-1", "run.seed must be in"),
    ("run.steps=5\n[optim]\nlr=nan", "must be one line"),
])
def test_values_torch_or_toml_would_take_badly_are_refused(override, fragment):
    with pytest.raises(CdmpiError, match=fragment):
        config.from_dict({}, [override])


def test_a_config_that_nests_too_deeply_is_one_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(CdmpiError, match="nests too deeply"):
        config.load(path)
