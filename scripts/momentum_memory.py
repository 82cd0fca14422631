"""Client-state memory of the momentum family with 1,000 registered clients, 50 per round.

Each strategy runs in its own subprocess (so peak RSS is its own) on the inline engine, where
all 1,000 node Contexts live in one process: the worst case for simulated client state. After
the run the script walks every Context's ``state`` and reports what is kept, next to the peak
RSS (``ru_maxrss``).

What a client keeps (strategies/momentum.py): SCAFFOLD, SCAFFOLD-M, SCAFFOLD-M-VR keep c_i
(one float32 per trainable parameter) from their first participation on; FedAvg-M(-VR) keep
nothing. No optimizer state, no copy of x^{r-1} (the VR clients rebuild it from the message).

    nice -n 10 python scripts/momentum_memory.py [--rounds 20] [--out docs/momentum_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

STRATEGIES = ["fedavg", "fedavg_m", "fedavg_m_vr", "scaffold", "scaffold_m", "scaffold_m_vr"]
ROOT = Path(__file__).resolve().parents[1]


def overrides(strategy: str, rounds: int, clients: int, per_round: int) -> list[str]:
    data = ROOT.parent / "shared" / "data" / "mnist10k.npz"
    ds = ["dataset=mnist10k", f"dataset.path={data}"] if data.is_file() else ["dataset=synthetic"]
    return ds + [
        f"strategy={strategy}",
        "partition=iid",
        f"num_clients={clients}",
        f"participation.fraction={per_round / clients}",
        f"rounds={rounds}",
        "client.steps=5",
        "client.batch_size=8",
        "client.lr=0.05",
        "client.num_threads=1",
        "eval.every=1000",
        "model=mlp",
    ]


def child(strategy: str, rounds: int, clients: int, per_round: int) -> dict:
    """Run one strategy in this process; return the state census and peak RSS."""
    import torch

    torch.set_num_threads(1)
    from fedsim.client import make_client_app
    from fedsim.compose import compose_config
    from fedsim.engines.base import set_server_identity
    from fedsim.engines.inline import InlineGrid
    from fedsim.experiment import prepare, quiet_flower
    from fedsim.server import run_server

    quiet_flower()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = prepare(compose_config(overrides(strategy, rounds, clients, per_round)))
    set_server_identity()
    grid = InlineGrid(make_client_app(cfg), cfg["num_clients"])
    summary = run_server(grid, cfg, None, engine="inline")
    with_state, state_bytes, keys = 0, 0, set()
    for ctx in grid.contexts.values():
        recs = ctx.state.array_records
        if recs:
            with_state += 1
            keys.update(recs.keys())
            state_bytes += sum(len(a.data) for rec in recs.values() for a in rec.values())
    from fedsim.client import get_runtime

    model = get_runtime(cfg).model
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "strategy": strategy,
        "clients": clients,
        "per_round": per_round,
        "rounds": rounds,
        "params": n_params,
        "clients_with_state": with_state,
        "state_keys": sorted(keys),
        "state_mib": state_bytes / 2**20,
        "bytes_per_client_with_state": state_bytes / with_state if with_state else 0,
        "rss_before_mib": rss0 / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_accuracy": summary["final_accuracy"],
        "mib_down_per_round": summary["bytes_down"] / rounds / 2**20,
        "mib_up_per_round": summary["bytes_up"] / rounds / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "docs" / "momentum_memory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.rounds, a.clients, a.per_round)))
        return
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    rows = []
    for s in STRATEGIES:
        cmd = [sys.executable, __file__, "--child", s, "--rounds", str(a.rounds), "--clients", str(a.clients),
               "--per-round", str(a.per_round)]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{s:14s} clients with state {r['clients_with_state']:4d}  state {r['state_mib']:7.1f} MiB "
              f"({r['bytes_per_client_with_state'] / 1024:6.1f} KiB each, keys {r['state_keys']})  "
              f"peak RSS {r['peak_rss_mib']:7.1f} MiB  down/up per round {r['mib_down_per_round']:.1f}/"
              f"{r['mib_up_per_round']:.1f} MiB", flush=True)
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["rss_over_fedavg_mib"] = r["peak_rss_mib"] - base
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print(f"params d = {rows[0]['params']} -> one c_i = {4 * rows[0]['params'] / 1024:.1f} KiB; wrote {a.out}")


if __name__ == "__main__":
    main()
