"""Benchmark mode: ``fedsim +experiment=inversion_<attack>``.

Picks ``num_images`` target images (batches of ``batch_size``), computes what a client would send
on the given model (a FedSGD gradient, or a FedAvg update after ``protocol.steps`` local steps;
optionally after ``train_steps`` SGD steps of pre-training on other images, standing in for
earlier FL rounds; optionally through client-side ``defenses``), runs every attack in
``attacks`` on the same payloads, and scores them (:mod:`attacks.inversion.metrics`): per-image
MSE / PSNR / SSIM / label accuracy, the median and success rate, the black and dataset-mean
floors, CPU seconds. Writes ``inversion.json`` and one PNG grid per attack (truth above
reconstruction) to the run directory.

The attack only ever receives the :class:`common.Payload`; the truth stays here. The single
exception is the well-informed bound (``DropoutInversion(mode='wiig')``), which by definition is
handed the client's true dropout masks -- it is reported as a bound, not an attack.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.inversion import metrics
from attacks.inversion.common import Payload, local_update, model_gradient
from attacks.inversion.data import load_pool, pick
from attacks.inversion.models import build as build_model
from fedsim.config import ConfigError

log = logging.getLogger("fedsim")

DEFAULTS: dict[str, Any] = {
    "data": "digits",  # digits | mnist
    "data_path": None,  # mnist: the npz file
    "num_images": 20,
    "batch_size": 1,
    "distinct_labels": False,  # batches with distinct labels (Yin et al.'s label rule assumes it)
    "model": {"name": "sigmoid_lenet"},  # attacks.inversion.models.MODELS + kwargs
    "reinit_per_batch": False,  # a fresh random model per target batch (DLG/iDLG's protocol)
    "train_steps": 0,  # SGD steps (batch 32, lr 0.1) on other pool images before the attack
    "protocol": {"kind": "fedsgd", "lr": 0.1, "steps": 1, "batch": 0},  # fedsgd | fedavg
    "share_labels": False,  # the protocol shares the labels with the server
    "attacks": {},  # name -> _target_ node of an attack with .reconstruct(payload)
    "defenses": [],  # transform nodes (defenses.privacy) applied to the gradient/update
    "threshold_db": 30.0,  # success = PSNR >= threshold
    "grid": 10,  # images shown per PNG
    "seed": 0,
    "threads": 1,  # torch threads (L-BFGS results depend on it)
}


class InversionConfigError(ConfigError):
    """A bad ``inversion.*`` key; the message names it."""


def resolve(node: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults + ``node``, checked before any data is touched."""
    node = dict(node or {})
    unknown = sorted(set(node) - set(DEFAULTS))
    if unknown:
        raise InversionConfigError(f"inversion.{unknown[0]}: unknown key (known: {sorted(DEFAULTS)})")
    cfg = {**copy.deepcopy(DEFAULTS), **node}
    proto = {**DEFAULTS["protocol"], **(cfg["protocol"] or {})}
    bad = sorted(set(proto) - set(DEFAULTS["protocol"]))
    if bad:
        raise InversionConfigError(f"inversion.protocol.{bad[0]}: unknown key")
    cfg["protocol"] = proto
    if cfg["data"] not in ("digits", "mnist"):
        raise InversionConfigError(f"inversion.data: '{cfg['data']}' is not one of digits, mnist")
    if cfg["data"] == "mnist" and (cfg["data_path"] is None or not Path(cfg["data_path"]).is_file()):
        raise InversionConfigError(f"inversion.data_path: MNIST npz not found: {cfg['data_path']}")
    if proto["kind"] not in ("fedsgd", "fedavg"):
        raise InversionConfigError(f"inversion.protocol.kind: '{proto['kind']}' is not one of fedsgd, fedavg")
    if int(cfg["batch_size"]) < 1 or int(cfg["num_images"]) < int(cfg["batch_size"]):
        raise InversionConfigError("inversion.num_images: must be >= batch_size >= 1")
    if not cfg["attacks"]:
        raise InversionConfigError("inversion.attacks: name at least one attack (name: {_target_: ...})")
    for name, a in cfg["attacks"].items():
        if not isinstance(a, dict) or "_target_" not in a:
            raise InversionConfigError(f"inversion.attacks.{name}: needs a _target_")
    from attacks.inversion.models import MODELS

    if cfg["model"].get("name") not in MODELS:
        raise InversionConfigError(f"inversion.model.name: '{cfg['model'].get('name')}' is not one of {sorted(MODELS)}")
    return cfg


def _instantiate_attacks(cfg: dict[str, Any]) -> dict[str, Any]:
    from hydra.utils import instantiate

    out = {}
    for name, node in cfg["attacks"].items():
        try:
            out[name] = instantiate(node, _convert_="all")
        except Exception as err:  # name the key, keep the cause
            raise InversionConfigError(f"inversion.attacks.{name}: {err}") from err
    return out


def _pretrain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    if steps <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def client_payload(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: dict[str, Any],
    num_classes: int,
    defense: Any | None,
    seed: int,
) -> tuple[Payload, list[torch.Tensor] | None]:
    """The client's message for ``(x, y)`` as the server sees it, and the true dropout masks."""
    from attacks.inversion.dia import dropout_layers

    proto = cfg["protocol"]
    torch.manual_seed(seed)  # the client's dropout masks
    model.train()
    if proto["kind"] == "fedsgd":
        obs = model_gradient(model, x, y)
        masks = [m.last_mask for m in dropout_layers(model)] or None
    else:
        obs = local_update(model, x, y, float(proto["lr"]), int(proto["steps"]), int(proto["batch"]))
        masks = None
    if defense is not None:
        obs = list(defense(obs, torch.Generator().manual_seed(seed + 1)))
    attacker_model = copy.deepcopy(model)
    for m in dropout_layers(attacker_model):
        m.last_mask = None  # the server's copy carries no trace of the client's masks
    payload = Payload(
        model=attacker_model,
        shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        num_images=int(x.shape[0]),
        gradient=obs if proto["kind"] == "fedsgd" else None,
        update=obs if proto["kind"] == "fedavg" else None,
        local_lr=float(proto["lr"]),
        local_steps=int(proto["steps"]),
        local_batch=int(proto["batch"]),
        labels=y.clone() if cfg["share_labels"] else None,
    )
    return payload, masks


def save_grid(path: Path, truth: torch.Tensor, rec: torch.Tensor, psnrs: list[float], title: str) -> None:
    """PNG: true images (top row) above their reconstructions (bottom row, PSNR in dB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = truth.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(0.9 * n + 0.4, 2.2), squeeze=False)
    for i in range(n):
        for row, img in ((0, truth[i]), (1, rec[i])):
            ax = axes[row][i]
            ax.imshow(metrics.clean(img)[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1][i].set_xlabel(f"{psnrs[i]:.0f}", fontsize=7)
    axes[0][0].set_ylabel("truth", fontsize=7)
    axes[1][0].set_ylabel("rec.", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def run_benchmark(node: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``node`` (see :data:`DEFAULTS`); return the summary."""
    cfg = resolve(node)
    from defenses.privacy import build as build_defense

    defense = build_defense(cfg["defenses"]) if cfg["defenses"] else None
    attacks = _instantiate_attacks(cfg)
    if int(cfg["threads"]) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg["seed"])
    x_pool, y_pool = load_pool(cfg["data"], cfg["data_path"])
    num_classes = int(y_pool.max()) + 1
    mkw = {k: v for k, v in cfg["model"].items() if k != "name"}
    model = build_model(cfg["model"]["name"], tuple(x_pool.shape[1:]), num_classes, seed, **mkw)
    bs = int(cfg["batch_size"])
    n_batches = int(cfg["num_images"]) // bs
    batches = pick(n_batches, bs, y_pool, seed, distinct_labels=bool(cfg["distinct_labels"]))
    used = torch.cat(batches)
    rest = torch.ones(len(y_pool), dtype=torch.bool)
    rest[used] = False
    _pretrain(model, x_pool[rest], y_pool[rest], int(cfg["train_steps"]), seed)
    floors = metrics.floors(x_pool[used], x_pool.mean(dim=0, keepdim=True))
    per: dict[str, dict[str, list]] = {n: {"psnr": [], "ssim": [], "mse": [], "label_acc": []} for n in attacks}
    shown: dict[str, list[torch.Tensor]] = {n: [] for n in attacks}
    cpu: dict[str, float] = {n: 0.0 for n in attacks}
    lp, lp_msg = metrics.lpips_or_skip("alex")
    if lp is None:
        log.info("%s", lp_msg)
    for b, idx in enumerate(batches):
        x, y = x_pool[idx], y_pool[idx]
        if cfg["reinit_per_batch"] and b > 0:
            model = build_model(cfg["model"]["name"], tuple(x_pool.shape[1:]), num_classes, seed * 1009 + b, **mkw)
            _pretrain(model, x_pool[rest], y_pool[rest], int(cfg["train_steps"]), seed)
        payload, masks = client_payload(model, x, y, cfg, num_classes, defense, seed * 100003 + b)
        for name, attack in attacks.items():
            p = copy.copy(payload)
            p.model = copy.deepcopy(payload.model)
            p.extra = {"masks": masks} if getattr(attack, "mode", None) == "wiig" else {}
            if hasattr(attack, "seed"):
                attack.seed = seed * 1000 + b
            t0 = time.process_time()
            rec, labels, _stats = attack.reconstruct(p)
            cpu[name] += time.process_time() - t0
            s = metrics.score(rec, x, labels, y, lp)
            for k in ("psnr", "ssim", "mse"):
                per[name][k] += s[k]
            per[name]["label_acc"].append(s["label_acc"])
            if "lpips" in s:
                per[name].setdefault("lpips", []).extend(s["lpips"])
            shown[name].append(metrics.clean(rec)[torch.as_tensor(s["order"])])
            log.info("batch %d/%d %s: PSNR %s, labels %.2f", b + 1, n_batches, name,
                     " ".join(f"{v:.1f}" for v in s["psnr"]), s["label_acc"])
    results: dict[str, Any] = {}
    thr = float(cfg["threshold_db"])
    truth_all = x_pool[used]
    for name in attacks:
        r = per[name]
        summ = metrics.summarize(r["psnr"], thr)
        summ.update(
            ssim_median=float(np.median(r["ssim"])),
            mse_median=float(np.median(r["mse"])),
            label_accuracy=float(np.mean(r["label_acc"])),
            cpu_seconds=round(cpu[name], 1),
            cpu_seconds_per_image=round(cpu[name] / len(r["psnr"]), 2),
        )
        if "lpips" in r:
            summ["lpips_median"] = float(np.median(r["lpips"]))
        results[name] = {"summary": summ, "per_image": r}
        log.info("%s: median PSNR %.1f dB, success(>=%.0f dB) %.0f%%, SSIM %.3f, labels %.0f%%, CPU %.0fs",
                 name, summ["psnr_median"], thr, 100 * summ["success_rate"], summ["ssim_median"],
                 100 * summ["label_accuracy"], summ["cpu_seconds"])
    k, s = metrics.ssim_window(*truth_all.shape[-2:])
    out = {
        "config": cfg,
        "floors": floors,
        "ssim_window": {"kernel_size": k, "sigma": s},
        "lpips": "on" if lp is not None else lp_msg,
        "results": results,
        "threads": torch.get_num_threads(),
    }
    log.info("floors: black %.1f dB, dataset mean %.1f dB", floors["floor_black_db"], floors["floor_mean_db"])
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "inversion.json").write_text(json.dumps(out, indent=1, default=str))
        g = int(cfg["grid"])
        for name in attacks if g > 0 else []:
            rec = torch.cat(shown[name])[:g]
            save_grid(run_dir / f"inversion_{name}.png", truth_all[:g], rec, results[name]["per_image"]["psnr"][:g], name)
    return out


def summary_for_cli(out: dict[str, Any]) -> dict[str, Any]:
    """The keys ``fedsim``'s CLI expects of a run summary (no FL accuracy in benchmark mode)."""
    return {"final_accuracy": None, "best_accuracy": None, "best_round": None, "inversion": out["results"]}
