"""A strategy whose clients fail on purpose, for the engines' failure tests.

``FailingFedAvg`` is FedAvg (weighted mean of the updates) that asks every client for the
``test-failing`` local algorithm: partitions in ``fail`` raise, partitions in ``sleep`` sleep
``sleep_s`` seconds before training (past ``engine.client_timeout``), and partitions in
``crash`` kill their worker process in round ``crash_round`` when that is a ray-engine actor
(elsewhere they raise, so every engine records the same failed partitions). The client imports
this module (the strategy's ``_target_``), which registers the local algorithm there too.
"""

from __future__ import annotations

import os
import time

import numpy as np

from fedsim.local import LocalAlgorithm, LocalRun, register_local_algorithm
from strategies.common import RoundUpdates, UpdateStrategy, weighted_mean


@register_local_algorithm("test-failing")
class FailingLocal(LocalAlgorithm):
    """Raises or sleeps for the partitions the train config names, else plain SGD."""

    def on_start(self, run: LocalRun) -> None:
        crash = run.partition_id in list(run.config.get("crash-pids", []))
        if crash and run.server_round == int(run.config.get("crash-round", 0)):
            with open("/proc/self/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ClientActor"):  # a ray-engine worker: die
                    os._exit(1)
            raise RuntimeError(f"injected crash in partition {run.partition_id}")
        if run.partition_id in list(run.config.get("fail-pids", [])):
            raise RuntimeError(f"injected failure in partition {run.partition_id}")
        if run.partition_id in list(run.config.get("sleep-pids", [])):
            time.sleep(float(run.config.get("sleep-s", 0.0)))


class FailingFedAvg(UpdateStrategy):
    """FedAvg whose clients in ``fail`` raise, in ``sleep`` sleep ``sleep_s`` seconds and in
    ``crash`` end their process (ray engine) or raise (other engines) in ``crash_round``."""

    def __init__(
        self,
        fail: list[int] | None = None,
        sleep: list[int] | None = None,
        sleep_s: float = 0.0,
        crash: list[int] | None = None,
        crash_round: int = 0,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.crash = [int(p) for p in crash or []] or [-1]
        self.crash_round = int(crash_round)
        self.fail = [int(p) for p in fail or []] or [-1]  # a ConfigRecord list may not be empty
        self.sleep = [int(p) for p in sleep or []] or [-1]
        self.sleep_s = float(sleep_s)

    def train_config_extra(self, server_round: int) -> dict[str, object]:
        return {
            "local-algorithm": "test-failing", "fail-pids": self.fail, "sleep-pids": self.sleep, "sleep-s": self.sleep_s,
            "crash-pids": self.crash, "crash-round": self.crash_round,
        }

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        if len(ru.node_ids) == 0:
            return None
        return self.global_vec + weighted_mean(ru.updates, ru.num_examples)
