# ruff: noqa: E402, E702, E731, B007, B023  (a harness: it imports the authors' modules after building them a temp package; compact test code)
"""Side by side: the authors' MUD-HoG (``server.py`` / ``clients.py`` of
LabSAINT/MUD-HoG_Federated_Learning, read at run time from a checkout or bare mirror you give,
never copied into fedsim) against fedsim's ``strategies/mudhog.py`` with the code-parity options
(``short_hog=frozen``, ``majority_includes_noise=true``), on synthetic updates of 40 clients.

Per round it compares ten sets (this round's sign-flip / noise / targeted / unreliable flags,
the confirmed sets, the aggregated clients) and the aggregated update (docs/reproductions.md).

usage: python scripts/sidebyside/mudhog_vs_authors.py --authors DIR [--kmeans-ninit 10|auto]
       [--dtype float64|float32] [--short-hog moving] [--majority-noise 0] [--verbose]
(DIR: a git checkout or bare mirror of the authors' repository; ``--short-hog moving`` and
``--majority-noise 0`` are negative controls: fedsim's defaults, which must differ.)
"""
import argparse
import functools
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
ap0 = argparse.ArgumentParser(add_help=False)
ap0.add_argument("--authors", type=Path, required=True)
AUTHORS = ap0.parse_known_args()[0].authors


def _read(path: str) -> str:
    """A file of the authors' repository: from a work tree, else via git (bare mirror)."""
    if (AUTHORS / path).is_file():
        return (AUTHORS / path).read_text()
    return subprocess.run(["git", "-C", str(AUTHORS), "show", f"HEAD:{path}"], capture_output=True,
                          text=True, check=True).stdout


# the authors' two modules in a temporary package directory, with a stub of their utils/
# (only what mud_hog's path calls: net2vec / vec2net / getTrainableParameters)
TMP = Path(tempfile.mkdtemp(prefix="mudhog_authors_"))
for f in ("server.py", "clients.py"):
    (TMP / f).write_text(_read(f))
(TMP / "utils").mkdir()
(TMP / "utils" / "__init__.py").write_text("")
(TMP / "utils" / "backdoor_utils.py").write_text("class Backdoor_Utils: pass\n")
(TMP / "utils" / "backdoor_semantic_utils.py").write_text("class SemanticBackdoor_Utils: pass\n")
(TMP / "utils" / "utils.py").write_text('''import torch
def net2vec(net):
    return torch.cat([v.flatten() for v in net.values()])
def vec2net(vec, net):
    i = 0
    for k, v in net.items():
        n = v.numel(); net[k] = vec[i:i+n].view_as(v).clone(); i += n
def getTrainableParameters(model):
    return [n for n, _ in model.named_parameters()]
''')
sys.path.insert(0, str(TMP))
sys.path.insert(1, str(ROOT))
import clients as AC  # noqa: E402  (the authors')
import server as A  # noqa: E402  (the authors')
from sklearn.cluster import DBSCAN as _DBSCAN
from sklearn.cluster import KMeans as _KMeans

from strategies.common import RoundUpdates
from strategies.mudhog import MudHoG, aggregation_weights

logging.disable(logging.CRITICAL)
torch.set_num_threads(1)

ap = argparse.ArgumentParser(parents=[ap0])
ap.add_argument("--kmeans-ninit", default="10")  # authors' sklearn 0.22.1 default is 10
ap.add_argument("--dtype", default="float64")
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--verbose", action="store_true")
ap.add_argument("--short-hog", default="frozen")  # negative control: moving
ap.add_argument("--majority-noise", type=int, default=1)  # negative control: 0
args = ap.parse_args()
NINIT = args.kmeans_ninit if args.kmeans_ninit == "auto" else int(args.kmeans_ninit)
A.KMeans = functools.partial(_KMeans, n_init=NINIT)


def _dbscan(eps, n_jobs=None, min_samples=5):  # same clustering, no worker pool
    return _DBSCAN(eps=eps, min_samples=min_samples)


A.DBSCAN = _dbscan
TDT = torch.float64 if args.dtype == "float64" else torch.float32
N, D = 40, 200


# ------------------------------------------------------------------ synthetic case
def make_case(seed, het, shift, rounds, noise=0.2, add_sigma_norm=3.0, unrel_scale=0.3, unrel_noise=0.5):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=D); u /= np.linalg.norm(u)
    v = rng.normal(size=D); v -= (v @ u) * u; v /= np.linalg.norm(v)
    types = np.array(["benign"] * 17 + ["signflip"] * 5 + ["noise"] * 6 + ["labelflip"] * 8 + ["unreliable"] * 4)
    types = types[rng.permutation(N)]
    H = rng.normal(size=(N, D)) * het / np.sqrt(D)
    out = []
    for t in range(rounds):
        base = u * (1.0 - 0.05 * t) + H + rng.normal(size=(N, D)) * noise / np.sqrt(D)
        U = base.copy()
        for i, ty in enumerate(types):
            if ty == "signflip":
                U[i] = -base[i]
            elif ty == "noise":
                U[i] = base[i] + rng.normal(size=D) * add_sigma_norm / np.sqrt(D)
            elif ty == "labelflip":
                U[i] = base[i] + shift * v
            elif ty == "unreliable":
                U[i] = unrel_scale * base[i] + rng.normal(size=D) * unrel_noise / np.sqrt(D)
        out.append(U)
    return types, out


# ------------------------------------------------------------------ authors' side
class Vec(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(D, dtype=TDT))


class FakeClient(AC.Client):
    """The authors' Client (its update(): sum_hog, avg_delta, hog_avg deque) fed given deltas."""

    def __init__(self, cid):
        super().__init__(cid, Vec(), [0], optimizer=None)
        self.next_delta = None

    def train(self):
        with torch.no_grad():
            self.model.w.copy_(self.originalState["w"] + torch.as_tensor(self.next_delta, dtype=TDT))
        self.isTrained = True


def run_authors(rounds_U, eps, min_samples):
    srv = A.Server(Vec(), None)
    srv.set_AR("mudhog")
    srv.dbscan_eps, srv.dbscan_min_samples = eps, min_samples
    cl = [FakeClient(i) for i in range(N)]
    for c in cl:
        srv.attach(c)
    captured = {}

    def prof(frame, event, arg):
        if event == "return" and frame.f_code is A.Server.mud_hog.__code__:
            captured.update(frame.f_locals)

    rec = []
    for t, U in enumerate(rounds_U):
        for c in cl:
            c.next_delta = U[c.cid]
        captured.clear()
        sys.setprofile(prof)
        try:
            before = srv.model.state_dict()["w"].clone()
            srv.train(range(N))
        finally:
            sys.setprofile(None)
        agg = (srv.model.state_dict()["w"] - before).double().numpy()
        L = captured
        if "flip_sign_id" in L:
            r = dict(sf=set(map(int, L["flip_sign_id"])), noise=set(map(int, L["uAtk_id"])),
                     targeted=set(map(int, L["tAtk_id"])), unrel=set(map(int, L["uRel_id"])),
                     aggset={c.cid for c in srv.normal_clients})
        else:
            r = dict(sf=set(), noise=set(), targeted=set(), unrel=set(), aggset=set(range(N)))
        r.update(mal=set(srv.mal_ids), conf_sf=set(srv.flip_sign_ids), conf_noise=set(srv.uAtk_ids),
                 conf_t=set(srv.tAtk_ids), conf_unrel=set(srv.unreliable_ids), agg=agg)
        rec.append(r)
    return rec


# ------------------------------------------------------------------ fedsim side
def run_fedsim(rounds_U, eps, min_samples):
    s = MudHoG(dbscan_eps=eps, dbscan_min_samples=min_samples, short_hog=args.short_hog, majority_includes_noise=bool(args.majority_noise))
    s.global_vec = np.zeros(D)
    ids = list(range(N))
    rec = []
    for t, U in enumerate(rounds_U):
        # fedsim gets float updates; feed the same numbers the authors' tensors hold
        Uin = torch.as_tensor(U, dtype=TDT).double().numpy()
        it = s.iter
        new = s.aggregate_updates(t + 1, RoundUpdates(ids, Uin, np.ones(N), []))
        agg = new - s.global_vec
        d = s.decisions
        if it >= s.tau0:
            lr = s.last_round
            w = aggregation_weights(ids, d, lr["targeted"], lr["noise"], 1.0)
            r = dict(sf=set(lr["signflip"]), noise=set(lr["noise"]), targeted=set(lr["targeted"]),
                     unrel=set(lr["unreliable"]), aggset={i for i in ids if w[i] > 0})
        else:
            r = dict(sf=set(), noise=set(), targeted=set(), unrel=set(), aggset=set(ids))
        r.update(mal=set(d.mal_ids), conf_sf=set(d.flip_sign_ids), conf_noise=set(d.uatk_ids),
                 conf_t=set(d.tatk_ids), conf_unrel=set(d.unreliable_ids), agg=agg)
        rec.append(r)
    return rec


KEYS = ["sf", "noise", "targeted", "unrel", "mal", "conf_sf", "conf_noise", "conf_t", "conf_unrel", "aggset"]


def compare(name, types, ra, rf):
    ndiff, maxagg = 0, 0.0
    for t, (a, f) in enumerate(zip(ra, rf)):
        maxagg = max(maxagg, float(np.abs(a["agg"] - f["agg"]).max()))
        for k in KEYS:
            if a[k] != f[k]:
                ndiff += 1
                print(f"  [{name}] round {t+1} {k}: authors-only {sorted(a[k]-f[k])} fedsim-only {sorted(f[k]-a[k])}")
    tb = lambda s: {ty: int(sum(types[i] == ty for i in s)) for ty in ("benign", "signflip", "noise", "labelflip", "unreliable") if sum(types[i] == ty for i in s)}
    last = ra[-1]
    print(f"[{name}] rounds={len(ra)} set-differences={ndiff} max|agg_authors-agg_fedsim|={maxagg:.2e}")
    if args.verbose or ndiff:
        for t, a in enumerate(ra):
            print(f"    r{t+1} authors: sf={tb(a['sf'])} noise={tb(a['noise'])} targ={tb(a['targeted'])} unrel={tb(a['unrel'])} mal={tb(a['mal'])} agg={len(a['aggset'])}")
    print(f"    final authors mal={tb(last['mal'])} conf_t={tb(last['conf_t'])} conf_unrel={tb(last['conf_unrel'])} aggregated={tb(last['aggset'])}")
    return ndiff


CASES = [
    # name, seed, het, shift, eps
    ("A:low-het seed0 eps0.6", 0, 0.3, 1.0, 0.6),
    ("A:low-het seed1 eps0.6", 1, 0.3, 1.0, 0.6),
    ("A:low-het seed0 eps0.45", 0, 0.3, 1.0, 0.45),
    ("B:high-het seed0 eps1.7", 0, 1.0, 0.4, 1.7),
    ("B:high-het seed1 eps1.7", 1, 1.0, 0.4, 1.7),
    ("B:high-het seed0 eps1.45", 0, 1.0, 0.4, 1.45),
    # eps below the benign spacing: DBSCAN noise label outnumbers the largest cluster
    ("C:low-het seed0 eps0.35", 0, 0.3, 1.0, 0.35),
    ("C:high-het seed1 eps1.2", 1, 1.0, 0.4, 1.2),
]
total = 0
for name, seed, het, shift, eps in CASES:
    types, Us = make_case(seed, het, shift, args.rounds)
    ra, rf = run_authors(Us, eps, 5), run_fedsim(Us, eps, 5)
    total += compare(name, types, ra, rf)
print(f"TOTAL set-differences over {len(CASES)} cases x {args.rounds} rounds x {len(KEYS)} sets: {total}")
