"""In-federation mode: a server-side gradient-inversion observer inside a normal fedsim run.

Two halves, kept apart on purpose (DESIGN.md: the harness alone holds the truth):

* :class:`InversionHook` -- the attacker. A reply hook (:class:`fedsim.grid.ReplyHook`): in the
  chosen ``rounds`` it takes the train replies of the chosen ``clients``, turns each into a
  :class:`common.Payload` from what the server holds (the global parameters it sent, the
  parameters the client returned, the train config: lr, local steps, batch size) and runs the
  attack. One local step gives the gradient ``g = (theta_global - theta_local) / lr`` (exact for
  plain SGD without momentum or weight decay); more steps give a FedAvg update. It never sees
  client data and passes the replies on unchanged.
* :class:`InversionScorer` -- the harness's round observer. It rebuilds the batches the client
  drew (the same seeded generator as :func:`fedsim.local.train_loop`), scores the hook's
  reconstructions (:mod:`metrics`, images mapped to [0, 1] by the data's global min/max) and
  adds ``inversion`` records to that round's line of ``metrics.jsonl``.

Config (a top-level ``observer`` node)::

    observer:
      _target_: attacks.inversion.observer.InversionObserver
      attack: {_target_: attacks.inversion.ig.InvertingGradients, iterations: 500}
      clients: [0]
      rounds: [1]
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from attacks.inversion import metrics
from attacks.inversion.common import Payload

log = logging.getLogger("fedsim")


class InversionHook:
    """The attacker half (reply hook); see the module docstring."""

    def __init__(self, attack: Any, clients: list[int], rounds: list[int], model: torch.nn.Module,
                 bounds: tuple[float, float], num_classes: int, shape: tuple[int, ...], max_images: int) -> None:
        self.attack, self.clients, self.rounds = attack, set(clients), set(rounds)
        self.model, self.bounds, self.num_classes, self.shape = model, bounds, num_classes, shape
        self.max_images = int(max_images)
        self.results: dict[tuple[int, int], dict[str, Any]] = {}

    def payload(self, sent, reply) -> Payload:
        from fedsim.arrays import record_to_torch

        glob = record_to_torch(sent.content.array_records["arrays"])
        local = record_to_torch(reply.content.array_records["arrays"])
        self.model.load_state_dict(glob)
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        delta = [(local[n] - glob[n]).float() for n in names]
        conf = sent.content.config_records.get("config", {})
        m = reply.content.metric_records.get("metrics", {})
        lr = float(conf.get("lr"))
        steps = int(m.get("train_steps", 1))
        batch = int(conf.get("batch-size"))
        n_img = min(int(m.get("num-examples", batch)), steps * batch)
        common = dict(model=self.model, shape=self.shape, num_classes=self.num_classes, num_images=n_img,
                      local_lr=lr, local_steps=steps, local_batch=batch, bounds=self.bounds)
        if steps == 1:
            return Payload(gradient=[-d / lr for d in delta], **common)
        return Payload(update=delta, **common)

    def on_train_replies(self, grid: Any, server_round: int, replies: list[Any]) -> list[Any]:
        if server_round not in self.rounds:
            return replies
        for r in replies:
            if r.has_error():
                continue
            pid = grid.pid(r.metadata.src_node_id)
            if pid not in self.clients:
                continue
            p = self.payload(grid.sent_train[r.metadata.src_node_id], r)
            if p.num_images > self.max_images:
                log.warning("inversion observer: partition %d sent an update over %d images (> max_images=%d); skipped",
                            pid, p.num_images, self.max_images)
                continue
            rec, labels, stats = self.attack.reconstruct(p)
            self.results[(server_round, pid)] = {"rec": rec, "labels": labels, "loss": float(stats.get("loss", float("nan")))}
        return replies


class InversionScorer:
    """The harness half (round observer): holds the truth and scores; see the module docstring."""

    def __init__(self, hook: InversionHook, data: Any, cfg: dict[str, Any], threshold_db: float) -> None:
        self.hook, self.data, self.cfg, self.threshold = hook, data, cfg, float(threshold_db)
        self.lo, self.hi = hook.bounds
        self.all_psnr: list[float] = []

    def truth(self, server_round: int, pid: int, steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        from fedsim.local import batches
        from fedsim.seeding import torch_gen

        x, y = self.data.client(pid)
        idx = torch.cat(list(batches(len(y), batch, steps, torch_gen(int(self.cfg["seed"]), "batches", server_round, pid))))
        return x[idx], y[idx]

    def to_unit(self, v: torch.Tensor) -> torch.Tensor:
        return (v - self.lo) / (self.hi - self.lo)

    def on_round_end(self, server_round: int, strategy: Any, grid: Any) -> dict[str, Any]:
        rows, round_psnr = [], []
        for (rnd, pid), res in sorted(self.hook.results.items()):
            if rnd != server_round:
                continue
            rec = res["rec"]
            steps = max(1, -(-rec.shape[0] // max(1, self._batch())))
            x, y = self.truth(rnd, pid, steps, self._batch())
            x, y = x[: rec.shape[0]], y[: rec.shape[0]]
            s = metrics.score(self.to_unit(rec), self.to_unit(x), res["labels"], y)
            self.all_psnr += s["psnr"]
            round_psnr += s["psnr"]
            rows.append({"partition": pid, "images": int(rec.shape[0]), "psnr_median": float(np.median(s["psnr"])),
                         "ssim_median": float(np.median(s["ssim"])), "label_acc": s["label_acc"], "loss": res["loss"]})
            log.info("round %d: inversion of partition %d: median PSNR %.1f dB, labels %.0f%%",
                     rnd, pid, rows[-1]["psnr_median"], 100 * s["label_acc"])
        # ``psnr``: the round's median over every attacked image (the column fedsim-report reads)
        return {"inversion": rows, "psnr": float(np.median(round_psnr))} if rows else {}

    def _batch(self) -> int:
        return int(self.cfg["client"]["batch_size"])

    def on_finish(self, strategy: Any, grid: Any) -> dict[str, Any]:
        if not self.all_psnr:
            return {}
        return {"inversion": metrics.summarize(self.all_psnr, self.threshold)}


class InversionObserver:
    """Config entry point (``observer._target_``): builds the hook and the scorer for a run."""

    def __init__(self, attack: Any, clients: list[int] | None = None, rounds: list[int] | None = None,
                 threshold_db: float = 20.0, max_images: int = 16) -> None:
        if attack is None or not hasattr(attack, "reconstruct"):
            raise ValueError("observer.attack: needs an attack _target_ with a reconstruct(payload) method")
        self.attack = attack
        self.clients = list(clients if clients is not None else [0])
        self.rounds = list(rounds if rounds is not None else [1])
        self.threshold_db = float(threshold_db)
        self.max_images = int(max_images)

    def plugins(self, cfg: dict[str, Any], data: Any) -> tuple[list[Any], list[Any]]:
        """``(reply hooks, round observers)`` for :func:`fedsim.server.run_server`."""
        from fedsim.models import build_model

        x_tr = torch.cat([data.client(p)[0] for p in range(int(cfg["num_clients"]))])
        bounds = (float(x_tr.min()), float(x_tr.max()))
        model = build_model(cfg["model"], data.in_shape, data.num_classes, int(cfg["seed"]))
        hook = InversionHook(self.attack, self.clients, self.rounds, model, bounds, data.num_classes,
                             tuple(data.in_shape), self.max_images)
        return [hook], [InversionScorer(hook, data, cfg, self.threshold_db)]
