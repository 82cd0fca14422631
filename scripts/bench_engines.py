"""Engine benchmark: one fixed workload on inline, ray, flower, batched, a plain PyTorch loop
and the vmap floor.

Workload (issue 3): 100 clients, all training every round, 3 rounds, MLP 64-64-10, 50 samples
each, batch 10, 1 epoch (5 SGD steps), FedAvg, central evaluation every round. The data are
scikit-learn's digits (8x8 = 64 features) resampled with a little noise, written to a
temporary ``.npz``. Every engine runs with one torch thread per client process
(``client.num_threads=1``) and Ray's default of one CPU per client.

``--workload lenet`` is the LeNet-5 / MNIST-shaped workload instead: 28x28 images (rows of
``$FEDSIM_MNIST10K`` or ``../shared/data/mnist10k.npz`` when present, else the digits upscaled to
28x28 with noise),
LeNet-5, the same 100 clients x 50 samples, batch 10.

The *vmap floor* (``floor``) is every client of a round trained at once with
``torch.func.vmap`` + ``functional_call`` and no framework at all (the same batches, SGD, average
and evaluation; warmed up before timing): what the hardware needs for the arithmetic.

The plain loop does the same arithmetic with no framework: load the global weights, the same
seeded batches, plain SGD, a weighted average, the same evaluation. It starts from the same
data split and initial model (prepared outside the timed region), so its final model must
equal the inline engine's up to float rounding, which the script checks.

Reported per engine: wall time (everything a user waits for: Ray start, actor pool, data,
rounds), the time in rounds (sum of the round records' ``seconds``), and the steady-state
round (mean of rounds 2-3: Flower's round 1 also waits for its actors to start), each the best
of ``--repeat`` interleaved runs (a shared machine's load comes in bursts). Then peak
memory (RSS) with 1,000 registered clients and 100 sampled per round: the driver's peak plus
each client worker's peak (Ray's own daemons excluded). Each measurement runs in a fresh
subprocess.

    nice -n 10 python scripts/bench_engines.py             # the table in docs/engines.md
    python scripts/bench_engines.py --engines inline plain  # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, BATCH, ROUNDS, SEED, LR = 50, 10, 3, 0, 0.1
MNIST = Path(os.environ.get("FEDSIM_MNIST10K", ROOT.parent / "shared" / "data" / "mnist10k.npz"))  # as configs/dataset/mnist10k.yaml
MODELS = {"mlp": "model=mlp", "lenet": "model=lenet5"}


def make_data(path: Path, num_clients: int, workload: str = "mlp") -> None:
    """``num_clients * 50`` train rows, 1,000 test rows. ``mlp``: digits resampled with noise (64
    features); ``lenet``: 28x28 images, MNIST rows (mnist10k.npz) or upscaled digits + noise."""
    import numpy as np
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    if workload == "lenet" and MNIST.is_file():
        with np.load(MNIST, allow_pickle=False) as f:
            images, labels = f["x"].astype(np.float32) / 255.0, f["y"].astype(np.int64)
    else:
        d = load_digits()
        images, labels = d.data / 16.0, d.target.astype(np.int64)
        if workload == "lenet":  # 8x8 -> 24x24 (3x3 blocks) -> 28x28 (zero border)
            images = np.pad(np.kron(images.reshape(-1, 8, 8), np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        i = rng.integers(0, len(labels), n)
        return (images[i] + rng.normal(0, 0.1, (n, *images.shape[1:]))).astype(np.float32), labels[i]

    x, y = draw(num_clients * SAMPLES)
    xt, yt = draw(1000)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)


def overrides(data: Path, num_clients: int, sampled: int, engine: str, workload: str = "mlp") -> list[str]:
    return [
        "dataset=npz", f"dataset.path={data}", "partition=iid", MODELS[workload], "strategy=fedavg",
        f"num_clients={num_clients}", f"rounds={ROUNDS}", f"seed={SEED}",
        "participation=sampled", f"participation.fraction={sampled / num_clients}",
        "client.epochs=1", f"client.batch_size={BATCH}", f"client.lr={LR}", "client.num_threads=1",
        f"engine={engine}",
    ]


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _descends(pid: int, root: int) -> bool:
    """True when ``pid`` is a descendant of ``root`` (a local Ray's workers descend from the driver)."""
    while pid > 1:
        pid = _parent(pid)
        if pid == root:
            return True
    return False


class PeakRSS:
    """Peak RSS of this process plus that of every Ray client worker it started."""

    TITLES = (b"ray::ClientActor", b"ray::ClientAppActor", b"ray::BatchedClientActor")

    def __init__(self) -> None:
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _hwm(pid: int | str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    pid = int(proc.name)
                    if (proc / "cmdline").read_bytes().startswith(self.TITLES) and _descends(pid, os.getpid()):
                        self.workers[pid] = self._hwm(pid)
                except OSError:
                    continue

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        driver = self._hwm("self")
        return {"driver_mb": driver / 2**20, "workers_mb": sum(self.workers.values()) / 2**20, "num_workers": len(self.workers)}


def worker_engine(engine: str, data: Path, num_clients: int, sampled: int, out: Path, workload: str = "mlp") -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedsim.compose import compose_config
    from fedsim.experiment import run_experiment
    from fedsim.results import read_metrics

    run_dir = out.parent / f"run-{engine}-{num_clients}"
    cpu = _time_rounds_cpu()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        ov = overrides(data, num_clients, sampled, "ray" if engine == "ray-batched" else engine, workload)
        ov.append("output.overwrite=true")  # timings: always rerun
        if engine == "ray-batched":
            ov.append("engine.batched=true")
        summary = run_experiment(compose_config(ov), run_dir)
        wall = time.perf_counter() - t0
    secs = [r["seconds"] for r in read_metrics(run_dir)]
    out.write_text(json.dumps({
        "wall": wall, "rounds": sum(secs), "steady": sum(secs[1:]) / max(1, len(secs) - 1),
        "accuracy": summary["final_accuracy"], "model": str(run_dir / "model.pt"), **mem.result(),
        "cpu": cpu[-1] - cpu[0],
    }))


def _time_rounds_cpu() -> list[float]:
    """This process's CPU time at the start of round 1 and at each round record (bench-only
    instrumentation: meaningful for inline, where the clients run in this process)."""
    from fedsim.grid import FedsimGrid
    from fedsim.results import Recorder

    marks: list[float] = []
    begin, add = FedsimGrid.begin_round, Recorder.add

    def begin_round(self, server_round: int) -> None:
        if server_round == 1:
            marks.append(time.process_time())
        begin(self, server_round)

    def record(self, row: dict) -> None:
        marks.append(time.process_time())
        add(self, row)

    FedsimGrid.begin_round, Recorder.add = begin_round, record
    return marks


def _setup(data: Path, num_clients: int, workload: str):  # noqa: ANN202
    """Not timed: the split, initial weights and test set the engines start from."""
    import torch
    from omegaconf import OmegaConf

    from fedsim.compose import compose_config
    from fedsim.data import load_federated
    from fedsim.models import build_model

    torch.set_num_threads(1)
    cfg = OmegaConf.to_container(compose_config(overrides(data, num_clients, num_clients, "inline", workload)), resolve=True)
    fd = load_federated(OmegaConf.create(cfg["dataset"]), OmegaConf.create(cfg["partition"]), num_clients, SEED)
    model = build_model(cfg["model"], fd.in_shape, fd.num_classes, SEED)
    return fd, model, [fd.client(p) for p in range(num_clients)]


def worker_floor(data: Path, num_clients: int, out: Path, workload: str = "mlp") -> None:
    """Every client of a round at once: ``vmap(grad(loss))`` over stacked parameters, no framework.

    The same batches (seeded per round and client), SGD, weighted average and evaluation as the
    plain loop; the vmapped gradient is warmed up before timing. Clients hold equal data here.
    """
    import torch
    from torch.func import functional_call, grad, vmap

    from fedsim.seeding import derive_seed

    fd, model, clients = _setup(data, num_clients, workload)
    x_test, y_test = fd.test()
    names = [n for n, _ in model.named_parameters()]
    xs, ys = torch.stack([x for x, _ in clients]), torch.stack([y for _, y in clients])
    n = ys.shape[1]
    sizes = torch.full((num_clients,), float(n))
    wts = sizes / sizes.sum()

    def loss(p, x, y):  # noqa: ANN001, ANN202
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    gfn = vmap(grad(loss))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ar = torch.arange(num_clients)[:, None]
    gfn({k: weights[k].expand(num_clients, *weights[k].shape) for k in names}, xs[:, :BATCH], ys[:, :BATCH])  # warm-up

    t0, c0, secs = time.perf_counter(), time.process_time(), []
    for rnd in range(1, ROUNDS + 1):
        tr = time.perf_counter()
        perms = []
        for pid in range(num_clients):
            gen = torch.Generator()
            gen.manual_seed(derive_seed(SEED, "batches", rnd, pid))
            perms.append(torch.randperm(n, generator=gen))
        perm = torch.stack(perms)
        p = {k: weights[k].expand(num_clients, *weights[k].shape).clone() for k in names}
        for s in range(0, n, BATCH):
            idx = perm[:, s : s + BATCH]
            g = gfn(p, xs[ar, idx], ys[ar, idx])
            p = {k: p[k] - LR * g[k] for k in names}
        weights = {k: torch.tensordot(wts, p[k], dims=1) for k in names}
        with torch.no_grad():
            acc = float((functional_call(model, weights, (x_test,)).argmax(1) == y_test).float().mean())
        secs.append(time.perf_counter() - tr)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    path = out.parent / "floor-model.pt"
    torch.save(weights, path)
    out.write_text(json.dumps({"wall": elapsed, "rounds": sum(secs), "steady": sum(secs[1:]) / (len(secs) - 1),
                               "accuracy": acc, "model": str(path), "cpu": cpu}))


def worker_plain(data: Path, num_clients: int, out: Path, workload: str = "mlp") -> None:
    """The same arithmetic as FedAvg on the inline engine, in plain PyTorch."""
    import torch

    from fedsim.seeding import derive_seed

    fd, model, clients = _setup(data, num_clients, workload)  # not timed
    x_test, y_test = fd.test()
    loss_fn = torch.nn.functional.cross_entropy
    torch.optim.SGD(model.parameters(), lr=0.0)  # torch's lazy imports, as the engines' warm-up

    t0, c0, secs = time.perf_counter(), time.process_time(), []
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for rnd in range(1, ROUNDS + 1):
        tr = time.perf_counter()
        total = float(sum(len(y) for _, y in clients))
        new = {k: torch.zeros_like(v) for k, v in weights.items()}
        for pid, (x, y) in enumerate(clients):
            model.load_state_dict(weights)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            gen = torch.Generator()
            gen.manual_seed(derive_seed(SEED, "batches", rnd, pid))
            perm = torch.randperm(len(y), generator=gen)
            for s in range(0, len(y), BATCH):
                idx = perm[s : s + BATCH]
                loss = loss_fn(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    new[k] += v * (len(y) / total)
        weights = new
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        secs.append(time.perf_counter() - tr)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    path = out.parent / "plain-model.pt"
    torch.save(weights, path)
    out.write_text(json.dumps({"wall": elapsed, "rounds": sum(secs), "steady": sum(secs[1:]) / (len(secs) - 1),
                               "accuracy": acc, "model": str(path), "cpu": cpu}))


def spawn(args: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, __file__, *args, "--out", str(out)], check=True, cwd=ROOT)
    return json.loads(out.read_text())


def max_diff(a: str, b: str) -> float:
    import torch

    x, y = torch.load(a), torch.load(b)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["floor", "plain", "batched", "inline", "ray", "flower"],
                    help="of floor, plain, batched, inline, ray, ray-batched, flower")
    ap.add_argument("--workload", choices=sorted(MODELS), default="mlp")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="runs per engine; the best of them is reported")
    ap.add_argument("--memory-clients", type=int, default=1000, help="registered clients of the memory run (0: skip)")
    ap.add_argument("--memory-sampled", type=int, default=100)
    ap.add_argument("--memory-engines", nargs="+", help="engines of the memory run (default: --engines but floor, plain)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--sampled", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "plain":
        return worker_plain(a.data, a.clients, a.out, a.workload)
    if a.worker == "floor":
        return worker_floor(a.data, a.clients, a.out, a.workload)
    if a.worker:
        return worker_engine(a.worker, a.data, a.clients, a.sampled, a.out, a.workload)

    print(f"machine: {machine()}")
    model = {"mlp": "MLP 64-64-10", "lenet": "LeNet-5 on 28x28"}[a.workload]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "bench.npz"
        make_data(data, a.clients, a.workload)
        res = {}
        for rep in range(a.repeat):  # interleaved, so a burst of load hits every engine alike
            for e in a.engines:
                args = ["--worker", e, "--data", str(data), "--clients", str(a.clients), "--sampled", str(a.clients),
                        "--workload", a.workload]
                r = spawn(args, tmp / f"{e}-{rep}.json")
                print(f"  {e} #{rep + 1}: wall {r['wall']:.2f}s, rounds {r['rounds']:.3f}s", flush=True)
                if e in res:  # best of the repeats, metric by metric
                    r = {k: min(v, res[e][k]) if k in ("wall", "rounds", "steady", "cpu") else res[e][k] for k, v in r.items()}
                res[e] = r
        print(f"\n{a.clients} clients x {SAMPLES} samples, {ROUNDS} rounds, {model}, batch {BATCH}, 1 epoch, FedAvg "
              f"(best of {a.repeat}; load average {os.getloadavg()[0]:.1f} at the end)")
        base = res.get("floor") or res.get("plain")
        ref = "floor" if "floor" in res else "plain"
        print(f"{'engine':12} {'wall s':>8} {'rounds s':>9} {'round s':>8} {'accuracy':>9}  rounds/{ref}  wall/{ref}-rounds")
        for e, r in res.items():
            rel = f"{r['rounds'] / base['rounds']:>10.2f}x  {r['wall'] / base['rounds']:>12.2f}x" if base else ""
            print(f"{e:12} {r['wall']:8.2f} {r['rounds']:9.3f} {r['steady']:8.4f} {r['accuracy']:9.4f}  {rel}")
        if "batched" in res:
            b = res["batched"]
            for other in ("floor", "inline", "flower", "ray"):
                if other in res:
                    o = res[other]
                    print(f"{other} / batched: rounds {o['rounds'] / b['rounds']:.2f}x, wall {o['wall'] / b['wall']:.2f}x; "
                          f"final models differ by at most {max_diff(b['model'], o['model']):.2e}")
        if "plain" in res and "inline" in res:
            p = res["plain"]
            print(f"inline rounds / plain loop = {res['inline']['rounds'] / p['rounds']:.2f} in wall time, "
                  f"{res['inline']['cpu'] / p['cpu']:.2f} in CPU time; "
                  f"final models differ by at most {max_diff(res['inline']['model'], p['model']):.2e}")
        if "ray" in res and "flower" in res:
            f, r = res["flower"], res["ray"]
            print(f"flower / ray: wall {f['wall'] / r['wall']:.2f}x, rounds {f['rounds'] / r['rounds']:.2f}x, "
                  f"steady round {f['steady'] / r['steady']:.2f}x; "
                  f"ray vs flower models differ by {max_diff(r['model'], f['model']):.2e}")
        if a.memory_clients:
            n, k = a.memory_clients, a.memory_sampled
            data = tmp / "bench-mem.npz"
            make_data(data, n, a.workload)
            print(f"\npeak memory, {n} registered clients x {SAMPLES} samples, {k} sampled per round, {ROUNDS} rounds, {model}")
            print(f"{'engine':12} {'driver MB':>10} {'workers MB':>11} {'workers':>8} {'wall s':>8} {'rounds s':>9}")
            for e in a.memory_engines or [e for e in a.engines if e not in ("plain", "floor")]:
                m = spawn(["--worker", e, "--data", str(data), "--clients", str(n), "--sampled", str(k),
                           "--workload", a.workload], tmp / f"mem-{e}.json")
                print(f"{e:12} {m['driver_mb']:10.0f} {m['workers_mb']:11.0f} {m['num_workers']:8d} {m['wall']:8.1f} "
                      f"{m['rounds']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
