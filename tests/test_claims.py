"""``fedsim-report --claim / --best-over / --grid``: paired per-seed verdicts computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_report import fake_run  # tests/ is on sys.path (pytest prepend import mode)

from fedsim import claims, report


@pytest.fixture
def lr_sweep(tmp_path) -> Path:
    """method x lr x seed (last-2 means by hand in the comments); one diverged run."""
    root = tmp_path / "multirun"
    runs = {
        # (method, lr, seed): accuracies; last2 = mean of the last two
        ("a", "0.1", "0"): [0.5, 0.6, 0.7],   # 0.65
        ("a", "0.1", "1"): [0.5, 0.7, 0.9],   # 0.80
        ("a", "0.5", "0"): [0.5, 0.9, 0.9],   # 0.90
        ("a", "0.5", "1"): [0.5, 0.9, 0.1],   # diverged: 0.5 not eligible although seed 0 is high
        ("b", "0.1", "0"): [0.5, 0.6, 0.6],   # 0.60
        ("b", "0.1", "1"): [0.5, 0.6, 0.8],   # 0.70
        ("b", "0.5", "0"): [0.5, 0.5, 0.5],   # 0.50
        ("b", "0.5", "1"): [0.5, 0.5, 0.7],   # 0.60
    }
    for i, ((m, lr, s), accs) in enumerate(runs.items()):
        status = "diverged at round 3" if (m, lr, s) == ("a", "0.5", "1") else "ok"
        fake_run(root / str(i), [f"method={m}", f"client.lr={lr}", f"seed={s}"], accs, status=status)
    return root


def test_parse_claim():
    c = claims.parse_claim("fedau_arm=fedau > fedau_arm=avg_participating by 0.03")
    assert c.a == ["fedau_arm=fedau"] and c.b == ["fedau_arm=avg_participating"] and c.size == 0.03
    c = claims.parse_claim("x=1 y=2 > x=0")
    assert c.a == ["x=1", "y=2"] and c.b == ["x=0"] and c.size is None
    c = claims.parse_claim("x=1 >= x=0 within 0.01")
    assert c.a == ["x=1"] and c.b == ["x=0"] and c.tol == 0.01 and c.size is None
    for bad in ("x=1", "x=1 > y", "x=1 > y=2 by -1", "x=1 >= x=0", "x=1 >= x=0 within -1"):
        with pytest.raises(ValueError, match="claim"):
            claims.parse_claim(bad)


def test_verdict_rule():
    assert claims.verdict([0.02, 0.01, 0.03], None) == "reproduced"
    assert claims.verdict([0.02, 0.01, 0.03], 0.04) == "reproduced"            # mean 0.02 >= 0.04 / 2
    assert claims.verdict([0.02, 0.01, 0.03], 0.05) == "reproduced in direction, not size"
    assert claims.verdict([0.05, -0.01, 0.02], None) == "reproduced in direction, not size"
    # positive on every seed but mean 0.0049 < 2 x SE (std 0.0045 / sqrt 3 = 0.0026): the spread explains it
    assert claims.verdict([0.0004, 0.0095, 0.005], None) == "reproduced in direction, not size"
    assert claims.verdict([0.03], None) == "reproduced in direction, not size"  # one seed is never enough
    assert claims.verdict([0.01, -0.02], None) == "not reproduced"
    assert claims.verdict([0.0, 0.0], 0.01) == "not reproduced"
    assert claims.verdict([-0.005, 0.01], None, tol=0.01) == "reproduced"          # on par
    assert claims.verdict([-0.02, 0.02], None, tol=0.01) == "reproduced in direction, not size"
    assert claims.verdict([-0.02, -0.01], None, tol=0.01) == "not reproduced"      # mean -0.015 < -0.01
    assert claims.verdict([0.02], None, tol=0.01) == "reproduced in direction, not size"  # one seed


def test_claims_paired_by_seed_at_fixed_lr(lr_sweep):
    rows = claims.evaluate([lr_sweep], [claims.parse_claim("method=a > method=b by 0.2")], last=2,
                           where=["client.lr=0.1"])
    r = rows[0]
    assert r["seeds"] == ["0", "1"]
    assert r["diffs"] == pytest.approx([0.05, 0.10])          # 0.65 - 0.60, 0.80 - 0.70
    assert r["mean_diff"] == pytest.approx(0.075)
    assert r["verdict"] == "reproduced in direction, not size"  # 0.075 < 0.2 / 2


def test_best_over_skips_a_step_size_that_diverged(lr_sweep):
    rows = claims.evaluate([lr_sweep], [claims.parse_claim("method=a > method=b")], last=2, best_over="client.lr")
    r = rows[0]
    assert r["a_at"] == "0.1" and r["b_at"] == "0.1"  # a@0.5 diverged on seed 1; b@0.1 (0.65) > b@0.5 (0.55)
    assert r["a_mean"] == pytest.approx(0.725) and r["b_mean"] == pytest.approx(0.65)
    assert r["verdict"] == "reproduced"
    grid = claims.best_grid([lr_sweep], "method", "client.lr", last=2)
    assert grid["a"]["0.5"] == (pytest.approx(0.9), 1, 1) and grid["b"]["0.5"] == (pytest.approx(0.55), 2, 0)
    md = claims.grid_markdown(grid, "method", "client.lr")
    assert "| a | **72.50** | 90.00 (1 div/failed) |" in md and "| b | **65.00** | 55.00 |" in md


def test_report_cli_writes_claims(lr_sweep, capsys):
    report.main([str(lr_sweep), "--last", "2", "--grid", "method:client.lr", "--best-over", "client.lr",
                 "--claim", "method=b > method=a", "--panels", "test_accuracy,test_accuracy,test_accuracy"])
    png = (lr_sweep / "panels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    out = capsys.readouterr().out
    assert "**not reproduced**" in out and "65.00 @ 0.1" in out
    assert (lr_sweep / "claims.md").read_text().count("|") > 20
    with pytest.raises(SystemExit):
        report.main([str(lr_sweep), "--claim", "method=zzz > method=a"])
    assert "no runs match method=zzz" in capsys.readouterr().err
