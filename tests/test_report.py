"""``fedsim-report`` on a synthetic multirun directory: numbers computed by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from fedsim import report


def fake_run(d: Path, overrides: list[str], accs: list[float], status: str | None = "ok", extra=None) -> None:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = {"seed": 0, "strategy": {"_target_": "x"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"round": i + 1, "test_accuracy": a, **(extra or {})} for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        (d / "summary.json").write_text(json.dumps({"status": status, "final_accuracy": accs[-1]}))


@pytest.fixture
def sweep(tmp_path):
    """threat x strategy x seed; one diverged, one killed (no summary), one with backdoor accuracy."""
    root = tmp_path / "multirun"
    fake_run(root / "a", ["strategy=fedavg", "threat=none", "seed=0"], [0.2, 0.6, 0.8])
    fake_run(root / "b", ["strategy=fedavg", "threat=none", "seed=1"], [0.3, 0.5, 0.6])
    fake_run(root / "c", ["strategy=fedavg", "threat=signflip", "seed=0"], [0.1, 0.2, 0.3])
    fake_run(root / "d", ["strategy=fedavg", "threat=signflip", "seed=1"], [0.1, 0.9, 0.1], status="diverged at round 3")
    fake_run(root / "e", ["strategy=krum", "threat=none", "seed=0"], [0.5, 0.7, 0.7], extra={"backdoor_accuracy": 0.25})
    fake_run(root / "f", ["strategy=krum", "threat=none", "seed=1"], [0.5, 0.7, 0.9], extra={"backdoor_accuracy": 0.75})
    fake_run(root / "g", ["strategy=krum", "threat=signflip", "seed=0"], [0.4, 0.5, 0.6])
    fake_run(root / "h", ["strategy=krum", "threat=signflip", "seed=1"], [0.4], status=None)  # killed
    (root / "multirun.yaml").write_text("{}")
    return root


def test_report_numbers_by_hand(sweep):
    rep = report.build([sweep], last=2)
    assert rep["keys"] == ["strategy", "threat"]  # seed varies but is averaged over
    rows = {(r["strategy"], r["threat"]): r for r in rep["rows"]}
    r = rows[("fedavg", "none")]
    assert r["n"] == 2 and r["excluded"] == 0
    assert r["final_mean"] == pytest.approx(0.7) and r["final_std"] == pytest.approx(0.1414213562, abs=1e-9)
    assert r["best_mean"] == pytest.approx(0.7)
    assert r["last2_mean"] == pytest.approx((0.7 + 0.55) / 2)  # seed 0: (0.6+0.8)/2, seed 1: (0.5+0.6)/2
    r = rows[("fedavg", "signflip")]  # the diverged seed is listed, not averaged
    assert r["n"] == 1 and r["excluded"] == 1 and "diverged at round 3" in r["excluded_runs"]
    assert r["final_mean"] == pytest.approx(0.3) and r["final_std"] == 0.0
    r = rows[("krum", "none")]
    assert r["final_mean"] == pytest.approx(0.8) and r["backdoor_mean"] == pytest.approx(0.5)
    assert r["backdoor_std"] == pytest.approx(0.3535533906, abs=1e-9)
    r = rows[("krum", "signflip")]
    assert r["n"] == 1 and r["excluded"] == 1 and "no summary.json" in r["excluded_runs"]
    assert "backdoor_mean" not in rows[("fedavg", "none")]


def test_report_files_and_filters(sweep, capsys):
    report.main([str(sweep), "--last", "2"])
    out = capsys.readouterr().out
    assert "| strategy | threat |" in out and "0.7000 ± 0.1414" in out and "Excluded runs" in out
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and float(rows[0]["final_mean"]) == pytest.approx(0.7)
    for png in ("curves.png", "heatmap.png"):
        data = (sweep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rep = report.build([sweep], where=["strategy=krum"])
    assert [r["threat"] for r in rep["rows"]] == ["none", "signflip"] and rep["keys"] == ["threat"]
    rep = report.build([sweep], metric="backdoor_accuracy", where=["threat=none", "strategy=krum"])
    assert rep["rows"][0]["final_mean"] == pytest.approx(0.5)
    with pytest.raises(SystemExit, match="no runs"):
        report.build([sweep], where=["strategy=nothing"])


def test_sweep_failure_count_ignores_diverged(sweep):
    runs = report.find_runs([sweep])
    assert len(runs) == 8
    assert sorted(d.name for d in runs if report.sweep_failed(d)) == ["h"]


def test_fedau_experiment_is_a_hydra_sweep():
    """``fedsim -m +experiment=fedau_markov`` sweeps the seven arms (each with its learning
    rates) over three seeds: the axes live in the experiment config."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from fedsim.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="fedsim.configs", version_base=None):
        cfg = compose("config", overrides=["+experiment=fedau_markov", "fedau_arm=avg_participating"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.strategy._target_ == "strategies.fedau.AvgParticipating"
    assert cfg.strategy.global_lr == 1.78 and cfg.client.lr == 0.0562 and cfg.participation.name == "markov"
    params = cfg.hydra.sweeper.params
    assert params["fedau_arm"].split(",") == ["fedau", "fedau_k50", "avg_participating", "avg_all",
                                               "known_prob", "mifa", "fedvarp"]
    assert params["seed"] == "0,1,2"


@pytest.mark.parametrize("experiment,group", [("momentum", "momentum_arm"), ("mudhog", "mudhog_arm"),
                                              ("fedau_cyclic", "fedau_arm")])
def test_experiment_arms_compose_and_validate(experiment, group):
    """Every arm of every paper sweep composes and passes validation (targets accept their
    arguments); digits stands in for mnist10k so the test needs no data file."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from fedsim.config import register_configs, validate

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="fedsim.configs", version_base=None):
        arms = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
        arms = arms.hydra.sweeper.params[group].split(",")
        targets = set()
        for arm in arms:
            cfg = compose("config", overrides=[f"+experiment={experiment}", f"{group}={arm}", "dataset=digits"])
            validate(cfg)
            targets.add(OmegaConf.to_yaml({"s": cfg.strategy, "t": cfg.threat, "c": cfg.client}))
            # Hydra's sweeper puts the sweep's own axes before the command line's +experiment=...:
            # the arm must win whatever the order (it did not: every arm ran the experiment's strategy)
            rev = compose("config", overrides=[f"{group}={arm}", f"+experiment={experiment}", "dataset=digits"])
            assert OmegaConf.to_container(rev) == OmegaConf.to_container(cfg), arm
    GlobalHydra.instance().clear()
    assert len(targets) == len(arms)  # every arm is a different configuration
    assert len(arms) >= 6
