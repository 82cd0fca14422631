"""Gradient inversion plumbing: benchmark mode, privacy mods, the in-federation observer."""

from __future__ import annotations

import json

import pytest
import torch

from defenses.privacy import ClipGlobalNorm, GaussianNoise, Prune, chain, global_norm
from fedsim.compose import compose_config
from fedsim.config import ConfigError
from fedsim.experiment import run_experiment
from fedsim.results import read_metrics


# -- defenses on tensors -----------------------------------------------------------------------
def test_clip_noise_prune_transforms():
    u = {"a": torch.full((10,), 3.0), "b": torch.full((2, 5), -4.0)}
    clipped = ClipGlobalNorm(4.0)(u)
    assert float(global_norm(clipped)) == pytest.approx(4.0)
    small = {"a": torch.full((4,), 0.1)}
    assert torch.equal(ClipGlobalNorm(4.0)(small)["a"], small["a"])
    g = torch.Generator().manual_seed(0)
    big = {"w": torch.zeros(20000)}
    noisy = GaussianNoise(std=0.1, clip=4.0)(big, g)["w"]
    assert noisy.std().item() == pytest.approx(0.1, rel=0.03) and abs(noisy.mean().item()) < 0.01
    v = {"w": torch.arange(1.0, 101.0)}
    pruned = Prune(90)(v)["w"]
    assert int((pruned == 0).sum()) == 90 and torch.equal(pruned[90:], v["w"][90:])
    as_list = chain(Prune(50), ClipGlobalNorm(1.0))([torch.arange(1.0, 5.0)], g)
    assert isinstance(as_list, list) and as_list[0][:2].abs().sum() == 0
    assert float(as_list[0].norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="percentage"):
        Prune(120)


# -- benchmark mode ----------------------------------------------------------------------------
def test_benchmark_mode_runs_from_hydra_and_writes_results(tmp_path):
    cfg = compose_config([
        "+experiment=inversion_dlg", "inversion.data=digits", "inversion.num_images=2",
        "inversion.attacks.dlg.iterations=2", "inversion.attacks.idlg.iterations=2",
    ])
    summary = run_experiment(cfg, tmp_path)
    assert summary["final_accuracy"] is None and set(summary["inversion"]) == {"dlg", "idlg"}
    out = json.loads((tmp_path / "inversion.json").read_text())
    assert out["floors"]["floor_black_db"] < out["floors"]["floor_mean_db"]
    assert out["ssim_window"]["kernel_size"] == 3  # 8x8 digits: the small window, reported
    s = out["results"]["idlg"]["summary"]
    assert s["n"] == 2 and s["label_accuracy"] == 1.0  # iDLG's label rule and "success_rate" in s and s["cpu_seconds"] >= 0
    assert (tmp_path / "inversion_idlg.png").is_file() and (tmp_path / "inversion_dlg.png").is_file()


def test_benchmark_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="inversion.bogus"):
        run_experiment(compose_config(["+experiment=inversion_idlg", "inversion.data=digits", "+inversion.bogus=1"]), tmp_path)
    with pytest.raises(ConfigError, match="inversion.data_path"):
        run_experiment(compose_config(["+experiment=inversion_idlg", "inversion.data_path=/nonexistent.npz"]), tmp_path)
    with pytest.raises(ConfigError, match="inversion.protocol.kind"):
        run_experiment(compose_config(["+experiment=inversion_idlg", "inversion.data=digits",
                                       "inversion.protocol.kind=fedprox"]), tmp_path)


def test_benchmark_fedavg_protocol_and_defense(tmp_path):
    from attacks.inversion.benchmark import run_benchmark

    node = {
        "data": "digits", "num_images": 2, "batch_size": 1, "grid": 0,
        "protocol": {"kind": "fedavg", "lr": 0.1, "steps": 2},
        "defenses": [{"_target_": "defenses.privacy.Prune", "p": 50}],
        "attacks": {"ig": {"_target_": "attacks.inversion.ig.InvertingGradients", "iterations": 5}},
    }
    out = run_benchmark(node)
    assert out["results"]["ig"]["summary"]["n"] == 2


# -- in federation -----------------------------------------------------------------------------
TINY = ["rounds=2", "num_clients=3", "client.epochs=1", "dataset.max_samples=300"]


def test_privacy_mod_changes_the_updates(tmp_path):
    mod = "{_target_: defenses.privacy.PrivacyMod, transforms: [{_target_: defenses.privacy.GaussianNoise, std: 1.0, clip: 1.0}]}"
    base = run_experiment(compose_config(TINY), tmp_path / "a")
    noisy = run_experiment(compose_config(TINY + [f"client.mods=[{mod}]"]), tmp_path / "b")
    again = run_experiment(compose_config(TINY + [f"client.mods=[{mod}]"]), tmp_path / "c")
    assert noisy["final_accuracy"] != base["final_accuracy"]
    assert noisy["final_accuracy"] == again["final_accuracy"]  # seeded per (round, partition)
    flower_dp = "{_target_: flwr.clientapp.mod.LocalDpMod, clipping_norm: 1.0, sensitivity: 1.0, epsilon: 1.0, delta: 1.0e-5}"
    dp = run_experiment(compose_config(TINY + [f"client.mods=[{flower_dp}]"]), tmp_path / "e")  # Flower's own mod
    assert dp["final_accuracy"] != base["final_accuracy"]
    with pytest.raises(ConfigError, match=r"client.mods\[0\]"):
        run_experiment(compose_config(TINY + ["client.mods=[no.such.mod]"]), tmp_path / "d")


def test_observer_attacks_a_client_and_logs_metrics(tmp_path):
    obs = ("+observer={_target_: attacks.inversion.observer.InversionObserver, clients: [1], rounds: [2], "
           "attack: {_target_: attacks.inversion.ig.InvertingGradients, iterations: 30}}")
    run_experiment(compose_config(TINY + ["client.steps=1", "client.batch_size=1", obs]), tmp_path)
    rows = read_metrics(tmp_path)
    assert "inversion" not in rows[0]
    (rec,) = rows[1]["inversion"]
    assert rec["partition"] == 1 and rec["images"] == 1 and 0 <= rec["label_acc"] <= 1
    assert rec["psnr_median"] > 0 and rows[1]["psnr"] == rec["psnr_median"]  # the column fedsim-report reads
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["inversion"]["n"] == 1
    from fedsim.report import run_metrics

    assert run_metrics(tmp_path, "test_accuracy", 1)["psnr"] == rec["psnr_median"]
    with pytest.raises(ConfigError, match="^observer: cannot be combined with output.checkpoint_every"):
        run_experiment(compose_config(TINY + [obs, "output.checkpoint_every=1"]), tmp_path / "ckpt")
