"""Bad input fails early with one clear message naming the key, before any data is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from fedsim.compose import compose_config
from fedsim.config import ConfigError, validate


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["rounds=-1"], "rounds"),
        (["num_clients=0"], "num_clients"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha"),
        (["dataset=npz"], "dataset.path"),
        (["dataset=npz", "dataset.path=/no/such/file.npz"], "dataset.path"),
        (["dataset=torchvision", "dataset.root=/no/such/dir"], "dataset.root"),
        (["client.lr=0"], "client.lr"),
        (["client.momentum=1.5"], "client.momentum"),
        (["eval.every=0"], "eval.every"),
        (["partition=natural"], "partition.name"),
        (["participation.fraction=0"], "participation.fraction"),
        (["+strategy.proximal_mu=0.1"], "strategy.proximal_mu"),  # not an argument of FedAvg
        (["strategy._target_=nope.Missing"], "strategy._target_"),
        (["model._target_=fedsim.models.CNN", "+model.depth=3"], "model.depth"),
    ],
)
def test_bad_values_name_the_key(overrides, key, monkeypatch):
    import fedsim.data

    def boom(*a, **k):  # validation must never reach the data
        raise AssertionError("data was loaded")

    monkeypatch.setattr(fedsim.data, "load_source", boom)
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("override", ["roundz=3", "client.lrr=0.1", "dataset.pth=x", "strategy.proximal_mu=0.1"])
def test_typos_rejected_by_schema(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        compose_config([override])
    assert override.split("=")[0].split(".")[-1] in str(err.value) + str(err.value.__cause__)


def test_wrong_type_rejected_by_schema():
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config(["rounds=abc"])
    assert "rounds" in str(err.value) + str(err.value.__cause__)


def test_unknown_group_option():
    with pytest.raises(ConfigCompositionException, match="dataset"):
        compose_config(["dataset=nope"])


def test_issue_example_composes_and_validates():
    cfg = compose_config(
        "dataset=synthetic partition=dirichlet partition.alpha=0.1 num_clients=50 strategy=fedprox "
        "strategy.proximal_mu=0.01 rounds=20 seed=3".split()
    )
    validate(cfg)
    assert cfg.strategy.proximal_mu == 0.01 and cfg.num_clients == 50


def test_cli_reports_config_error_with_exit_code(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "rounds=-1", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "rounds: must be >= 1" in out.stderr + out.stdout
