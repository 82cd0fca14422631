"""Markdown table of gradient-inversion benchmark runs (reads run directories only).

    python scripts/inversion_report.py outputs/bench_dlg_mnist outputs/bench_ig_b1 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run_dir: Path) -> list[str]:
    out = json.loads((run_dir / "inversion.json").read_text())
    c, f = out["config"], out["floors"]
    where = f"{c['data']}, {c['model']['name']}, B={c['batch_size']}, {c['protocol']['kind']}"
    lines = []
    for name, r in out["results"].items():
        s = r["summary"]
        lines.append(
            f"| {run_dir.name} | {name} | {where} | {s['n']} | {s['psnr_median']:.1f} "
            f"[{s['psnr_q25']:.1f}, {s['psnr_q75']:.1f}] | {100 * s['success_rate']:.0f} % (≥ {s['threshold_db']:.0f} dB) "
            f"| {s['ssim_median']:.3f} | {100 * s['label_accuracy']:.0f} % | {f['floor_black_db']:.1f} / {f['floor_mean_db']:.1f} "
            f"| {s['cpu_seconds']:.0f} ({s['cpu_seconds_per_image']:.1f}/img) |"
        )
    return lines


def main() -> None:
    print("| run | attack | set-up | images | PSNR median [q25, q75] dB | success | SSIM median | labels | floors black / mean dB | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in sys.argv[1:]:
        p = Path(d)
        if (p / "inversion.json").is_file():
            print("\n".join(rows(p)))
        else:
            print(f"| {p.name} | (no inversion.json: not finished) |||||||||")


if __name__ == "__main__":
    main()
