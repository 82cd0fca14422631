"""The Multi-metrics paper's Table 1 (EMNIST rows), scaled to mnist10k: MA / BA per defense x
attack, and the paper's ranking score.

    python scripts/backdoor_table.py            # pre-train once, run the grid, write the table
    python scripts/backdoor_table.py --table    # only rebuild the table from finished runs

Each cell is ``fedsim +experiment=backdoor_table strategy=S threat=T`` (the same config a
``fedsim -m +experiment=backdoor_table`` sweep runs), executed in this process one after another
(imports paid once) into ``outputs/backdoor_table/S__T``; finished cells are skipped, so a killed
run resumes. The clean start is ``outputs/backdoor_pretrain/model.pt``: clean FedAvg, same
set-up, ``--pretrain-rounds`` rounds. Needs ../shared/data/mnist10k.npz (or $FEDSIM_MNIST10K).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["fedavg", "krum", "multikrum", "foolsgold", "geomed", "weakdp", "flame", "multimetric"]
ATTACKS = ["model_replacement", "dba", "pgd", "edge_pgd"]
NAMES = {"fedavg": "FedAvg", "krum": "Krum", "multikrum": "Multi-Krum", "foolsgold": "FoolsGold", "geomed": "RFA",
         "weakdp": "Weak DP", "flame": "FLAME", "multimetric": "Multi-metrics"}
PAPER_EMNIST = {  # Huang et al. 2023, Table 1 (MA/BA in %): MR, DBA, PGD, edge-case PGD
    "fedavg": [(99.54, 96.00), (97.68, 94.13), (99.55, 10.00), (99.37, 96.00)],
    "multimetric": [(99.53, 0.00), (97.39, 4.23), (99.54, 0.00), (99.58, 0.00)],
    "flame": [(99.39, 0.00), (97.12, 17.38), (99.39, 0.00), (99.44, 13.00)],
    "krum": [(99.22, 0.00), (97.70, 0.56), (99.12, 1.00), (99.14, 12.00)],
}


def ranking_score(ma: list[float], ba: list[float], ma_ref: list[float], ba_ref: list[float]) -> float:
    """Sum over attacks of (MA - MA_FedAvg) / MA_FedAvg - (BA - BA_FedAvg) / BA_FedAvg (the paper's
    score). Guard: an attack whose FedAvg BA is 0 contributes no BA term (nothing to remove)."""
    s = 0.0
    for m, b, m0, b0 in zip(ma, ba, ma_ref, ba_ref):
        s += (m - m0) / m0
        if b0 > 0:
            s -= (b - b0) / b0
    return s


def _run(overrides: list[str], run_dir: Path) -> dict:
    from fedsim.compose import compose_config
    from fedsim.experiment import run_experiment

    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    t = time.time()
    summary = run_experiment(compose_config(overrides), run_dir)
    print(f"{run_dir.name}: MA {summary['final_accuracy']:.4f} BA {summary.get('backdoor_accuracy')} "
          f"({time.time() - t:.0f}s)", flush=True)
    return summary


def _cells(out: Path, at_round: int | None) -> dict:
    """``{strategy__attack: {ma, ba}}`` in %, from the final summary (``at_round=None``) or from
    the ``metrics.jsonl`` row of round ``at_round``."""
    cells = {}
    for s in STRATEGIES:
        for a in ["none", *ATTACKS]:
            d = out / f"{s}__{a}"
            if not (d / "summary.json").exists():
                continue
            if at_round is None:
                js = json.loads((d / "summary.json").read_text())
                ma, ba = js["final_accuracy"], js.get("backdoor_accuracy")
            else:
                rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x]
                row = next((r for r in rows if r["round"] == at_round), None)
                if row is None or row.get("test_accuracy") is None:
                    continue
                ma, ba = row["test_accuracy"], row.get("backdoor_accuracy")
            cells[f"{s}__{a}"] = {"ma": 100 * ma, "ba": None if ba is None else 100 * ba}
    return cells


def markdown(cells: dict) -> str:
    """Defense x attack MA/BA, the ranking score against FedAvg and the mean MA."""
    lines = ["| defense | " + " | ".join(f"{a} MA/BA" for a in ATTACKS) + " | rank score | mean MA |",
             "|---|" + "---|" * (len(ATTACKS) + 2)]
    ref = [cells.get(f"fedavg__{a}") for a in ATTACKS]
    for s in STRATEGIES:
        row = [cells.get(f"{s}__{a}") for a in ATTACKS]
        txt = " | ".join("-" if c is None else f"{c['ma']:.2f}/{c['ba']:.2f}" for c in row)
        if all(c is not None for c in row + ref):
            score = ranking_score([c["ma"] for c in row], [c["ba"] for c in row], [c["ma"] for c in ref], [c["ba"] for c in ref])
            sc, mean_ma = f"{score:+.2f}", f"{sum(c['ma'] for c in row) / len(row):.2f}"
        else:
            sc, mean_ma = "-", "-"
        lines.append(f"| {NAMES[s]} | {txt} | {sc} | {mean_ma} |")
    return "\n".join(lines)


def table(out: Path, rounds: int = 11) -> dict:
    final, before = _cells(out, None), _cells(out, rounds - 1)
    return {"final": final, "before_last_attack": before, "markdown_final": markdown(final),
            "markdown_before_last_attack": markdown(before)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="default: outputs/backdoor_table (seed 0), outputs/backdoor_table_sN")
    ap.add_argument("--pretrain-rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="only rebuild the table")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args()
    suffix = "" if args.seed == 0 else f"_s{args.seed}"
    out = Path(args.out) if args.out else ROOT / "outputs" / f"backdoor_table{suffix}"
    if not args.table:
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        import torch

        torch.set_num_threads(1)
        data = Path(os.environ.get("FEDSIM_MNIST10K", ROOT.parent / "shared" / "data" / "mnist10k.npz"))
        if not data.is_file():
            sys.exit(f"mnist10k not found at {data}: set FEDSIM_MNIST10K")
        os.environ["FEDSIM_MNIST10K"] = str(data)
        pre = ROOT / "outputs" / f"backdoor_pretrain{suffix}"  # per seed: the test split depends on it
        ckpt = pre / "model.pt"
        if not ckpt.exists():
            _run(["+experiment=backdoor_table", "threat=none", "init.checkpoint=null", f"rounds={args.pretrain_rounds}",
                  "output.save_model=true", f"seed={args.seed}"], pre)
        base = ["+experiment=backdoor_table", f"init.checkpoint={ckpt}", f"seed={args.seed}"]
        _run(base + ["strategy=fedavg", "threat=none"], out / "fedavg__none")
        for a in args.attacks.split(","):
            for s in args.strategies.split(","):
                _run(base + [f"strategy={s}", f"threat={a}"], out / f"{s}__{a}")
    res = table(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(res, indent=2))
    print("final round (an attack round):")
    print(res["markdown_final"])
    print("one round earlier (9 rounds after the previous attack):")
    print(res["markdown_before_last_attack"])


if __name__ == "__main__":
    main()
