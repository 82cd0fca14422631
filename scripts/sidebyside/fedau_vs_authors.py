# ruff: noqa: E402, E702, E731, B007, B023  (a harness: it imports the authors' modules after building them a temp package; compact test code)
"""Side by side: the round body of IBM/fedau ``main.py`` (read at run time from a checkout or
bare mirror you give, never copied into fedsim; executed with a stub model and sampler and
``iters_per_round=0``, so a client's "training" returns a given update) against fedsim's
``strategies/fedau.py``: per round, the weight of every participant (FedAU, K = inf / 50 / 5)
and the aggregated step of every method, on Bernoulli and Markov traces of 20 clients x 500
rounds (docs/reproductions.md).

usage: python scripts/sidebyside/fedau_vs_authors.py --authors DIR
"""
import argparse
import copy
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from strategies.common import RoundUpdates
from strategies.fedau import MIFA, AvgAll, AvgParticipating, FedAU, FedVarp, KnownProb

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("--authors", type=Path, required=True, help="checkout or bare mirror of IBM/fedau")
_dir = _ap.parse_args().authors
SRC = ((_dir / "main.py").read_text() if (_dir / "main.py").is_file() else subprocess.run(
    ["git", "-C", str(_dir), "show", "HEAD:main.py"], capture_output=True, text=True, check=True).stdout).splitlines()
TMP = Path(tempfile.mkdtemp(prefix="fedau_sbs_"))
BODY = textwrap.dedent("\n".join(SRC[123:222]))  # 'accumulated = 0' .. 'w_global += ...'
assert BODY.startswith("accumulated = 0") and BODY.rstrip().endswith("* w_tmp_a"), BODY[-80:]
CODE = compile(BODY, "fedau_main_round", "exec")

N, T, D = 20, 500, 6


def traces(seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.9, N)
    bern = rng.random((T, N)) < p
    # Markov: active->inactive with prob a, inactive->active with prob b; stationary b/(a+b)
    b = rng.uniform(0.01, 0.3, N); a = rng.uniform(0.05, 0.5, N)
    st = rng.random(N) < b / (a + b); mk = np.zeros((T, N), bool)
    for t in range(T):
        mk[t] = st
        st = np.where(st, rng.random(N) >= a, rng.random(N) < b)
    return [("bernoulli", bern, p), ("markov", mk, b / (a + b))]


class Sampler:
    def __init__(self, prob): self.participation_prob, self.cur = float(prob), False
    def sample(self): return self.cur


class Model:  # stub: get_weight() returns w_global + this node's delta
    def __init__(self): self.delta, self.model = None, type("M", (), {"train": lambda s: None})()
    def assign_weight(self, w): self.base = w.clone()
    def get_weight(self): return self.base + self.delta


def run_authors(method, K, trace, probs, deltas):
    model = Model()
    ns = dict(torch=torch, np=np, copy=copy, n_nodes=N, model=model, weighting_method=method, k_value=K,
              w_global=torch.zeros(D), worker_samplers=[Sampler(q) for q in probs],
              not_participate_count_at_node=[0] * N, participate_intervals_at_node=[[] for _ in range(N)],
              save_agg_weight=True, agg_weight_each_node=[None] * N, participation_count_each_node=[0] * N,
              agg_weight_filename=str(TMP / "aw.csv"), participation_count_filename=str(TMP / "pc.csv"),
              iters_per_round=0, device="cpu", step_size_global=1.0, transform_train=None,
              sample_minibatch=None, update_per_node=torch.zeros(N, D), update_all_avg=torch.zeros(D))
    W, G = [], []
    for t in range(T):
        for n in range(N):
            ns["worker_samplers"][n].cur = bool(trace[t, n])
        model.delta = None
        # node n's delta: patch get_weight per node via assign_weight order (nodes run in order 0..N-1)
        it = iter([torch.as_tensor(deltas[t, n]) for n in range(N) if trace[t, n]])
        model.get_weight = lambda: model.base + next(it)
        g0 = ns["w_global"].clone()
        exec(CODE, ns)
        W.append({n: (1.0 if ns["agg_weight_each_node"][n] is None else float(ns["agg_weight_each_node"][n]))
                  for n in range(N) if trace[t, n]})
        G.append((ns["w_global"] - g0).numpy().copy())
    return W, G


def run_fedsim(method, K, trace, probs, deltas):
    mk = {"adaptive": lambda: FedAU(cutoff=None if K >= 100000 else K), "average_participating": AvgParticipating,
          "average_all": AvgAll, "known_prob": KnownProb, "mifa": MIFA, "fedvarp": FedVarp}
    s = mk[method]()
    s.all_nodes = list(range(N)); s.node_to_pid = {n: n for n in range(N)}
    if method == "known_prob":
        s.probs = np.asarray(probs, float)
    s.global_vec = np.zeros(D)
    W, G = [], []
    for t in range(T):
        ids = [n for n in range(N) if trace[t, n]]
        new = s.aggregate_updates(t + 1, RoundUpdates(ids, deltas[t, ids].reshape(len(ids), D), np.ones(len(ids)), []))
        W.append(dict(getattr(s, "last_weights", {})) if method == "adaptive" else {})
        G.append(new - s.global_vec)
        s.global_vec = new
    return W, G


worst = 0.0
for seed in (0, 1):
    for tname, trace, probs in traces(seed):
        deltas = np.random.default_rng(100 + seed).normal(size=(T, N, D))
        for method, K in [("adaptive", 100000), ("adaptive", 50), ("adaptive", 5), ("average_participating", 0),
                          ("average_all", 0), ("known_prob", 0), ("mifa", 0), ("fedvarp", 0)]:
            Wa, Ga = run_authors(method, K, trace, probs, deltas)
            Wf, Gf = run_fedsim(method, K, trace, probs, deltas)
            dg = max(float(np.abs(a - f).max()) for a, f in zip(Ga, Gf))
            msg = f"seed{seed} {tname:9s} {method:22s} K={K:<6d} max|step diff|={dg:.2e}"
            if method == "adaptive":
                assert all(set(a) == set(f) for a, f in zip(Wa, Wf))
                dw = max((abs(a[n] - f[n]) for a, f in zip(Wa, Wf) for n in a), default=0.0)
                wmax = max(max(a.values(), default=0) for a in Wa)
                msg += f"  max|weight diff|={dw:.2e} (max weight {wmax:.1f}, {sum(map(len, Wa))} weights)"
                worst = max(worst, dw)
            worst = max(worst, dg)
            print(msg)
print(f"participation rate range per trace: mean {trace.mean():.2f}; WORST abs diff {worst:.2e}")
