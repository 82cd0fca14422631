"""Momentum and control variates against client drift: FedAvg-M, SCAFFOLD, SCAFFOLD-M, and the
variance-reduced FedAvg-M-VR / SCAFFOLD-M-VR. Server strategies and their client local
algorithms live together in this module (one family, one place).

References
----------
* [CHWY] Cheng, Huang, Wu, Yuan, "Momentum Benefits Non-IID Federated Learning Simply and
  Provably", ICLR 2024, arXiv 2306.16504 (Alg. 1 FedAvg-M, Alg. 2 SCAFFOLD-M, Sec. 5 VR).
* [SCAF] Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning", ICML 2020, arXiv 1910.06378, Alg. 1 with option II.

Notation: round r, global model x^r, K local steps of size eta (``client.lr``), sampled set
S_r (|S_r| = S), N registered clients, grad = nabla F(x_i^{r,k}; xi_i^{r,k}) on the step's
minibatch (the l2 term of ``client.weight_decay`` included).

Equations implemented
---------------------
Client i in S_r starts from x_i^{r,0} = x^r and runs, for k = 0..K-1,
x_i^{r,k+1} = x_i^{r,k} - eta * d_i^{r,k} with the direction

====================  ===========================================================================
FedAvg-M   [CHWY 1]   d = beta * grad + (1 - beta) * g^r
SCAFFOLD-M [CHWY 2]   d = beta * (grad - c_i^r + c^r) + (1 - beta) * g^r
FedAvg-M-VR           d = grad + (1 - beta) * (g^r - nabla F(x^{r-1}; xi_i^{r,k}))
SCAFFOLD-M-VR         d = grad - beta * (c_i^r - c^r) + (1 - beta) * (g^r - nabla F(x^{r-1}; xi_i^{r,k}))
SCAFFOLD   [SCAF 1]   SCAFFOLD-M with beta = 1:  d = grad - c_i + c
====================  ===========================================================================

(the VR gradient at the previous global model x^{r-1} is taken on the *same* minibatch, STORM
style). Control-variate methods then set c_i^{r+1} = (1/K) sum_k grad_k (the mean of the raw
local gradients; clients not sampled keep c_i) and upload Delta c_i = c_i^{r+1} - c_i^r. For
beta = 1 this is exactly [SCAF] option II, c_i^+ = c_i - c + (x - y_i) / (K eta), because
x - y_i = eta * sum_k (grad_k - c_i + c). The server, with Delta_i = x_i^{r,K} - x^r, does

    g^{r+1} = sum_{i in S_r} w_i (x^r - x_i^{r,K_i}) / (eta * Kbar)   Kbar = sum_i w_i K_i
    x^{r+1} = x^r - gamma * g^{r+1}
    c^{r+1} = c^r + (1/N) sum_{i in S_r} Delta c_i                   (control-variate methods)

w_i = 1/S (the papers) or n_i / sum n; K_i is the number of local steps client i actually took.
With a common K (``client.steps``, the papers' setting) this is exactly [CHWY]'s
g^{r+1} = (1/(eta K S)) sum_i (x^r - x_i^{r,K}). With unequal K_i (``client.epochs`` on unequal
partitions, or an attack hook skipping batches) g^{r+1} stays what the paper says it is, the
(w-weighted) mean of *all* local directions d_i^{r,k} taken in the round, and the model step
stays x^{r+1} = x^r - gamma g^{r+1}; no per-client 1/K_i rescaling (that would be FedNova, a
different algorithm). With g^0 = 0 (or a first round at beta = 1, see below), c^0 = c_i^0 = 0.
``gamma`` is the paper's global step in gradient units; by default it is derived from a
dimensionless server lr, gamma = global_lr * eta * Kbar, so that
x^{r+1} = x^r + global_lr * sum_i w_i Delta_i for every K_i: [SCAF]'s x + eta_g mean Delta y,
and FedAvg-M with beta = 1 *is* FedAvg with server lr ``global_lr``, which the tests check.

What was verified, and what was not
-----------------------------------
* SCAFFOLD: [SCAF] Alg. 1 (local step y <- y - eta_l (g_i(y) - c_i + c); option II;
  x <- x + eta_g * mean Delta y; c <- c + (|S|/N) * mean Delta c) -- checked against the
  published algorithm box structure and several independent implementations; the 1/N update
  keeps c = mean_i c_i under partial participation. tests/test_scaffold_reference.py runs
  fedsim's SCAFFOLD through the harness and an independent implementation of Alg. 1 on the same
  data, sampled clients and batches (unequal K_i): they agree to float32 round-off.
* FedAvg-M / SCAFFOLD-M: the algorithm boxes of arXiv 2306.16504 could NOT be read (the stored
  copies available to us expose only the title, abstract and introduction). The rules above are
  the ones in the project spec (specs/algorithms.md Sec. 2.1-2.2), which agree with the OpenReview
  reviews' description ("the server broadcasts the global gradient information to all clients
  (along with the model); clients embed it into local steps as a momentum item"; FedAvg-M "is
  exactly FedCM") and with FedCM's local rule. Treat the exact placement of beta and the
  1/(eta K S) normalisation of g as [UNVERIFIED, high confidence].
* VR variants: [UNVERIFIED]. FedAvg-M-VR is the STORM form quoted in the spec; SCAFFOLD-M-VR is
  derived by adding the same STORM correction to SCAFFOLD-M's direction (as the spec does).
* Initial momentum g^0 (``init_momentum``): the algorithms take g^0 as an input. "zero" uses
  g^0 = 0 (default for FedAvg-M, SCAFFOLD-M); "first_round" runs round 1 with beta = 1, so g^1
  is a plain average of stochastic gradients -- STORM's initialisation d_1 = grad f(x_1; xi_1)
  (default for the VR variants). With g^0 = 0 the STORM estimate starts with error
  -grad f(x^0), which decays only like (1 - beta)^r and enters every local step as
  -(1 - beta) grad F_i(x^{r-1}; xi), an ascent direction on the client's own loss; on MNIST
  with Dir(0.1) label skew this made the VR variants collapse (docs/momentum.md).

How x^{r-1} reaches the VR clients (``prev_model``)
---------------------------------------------------
A client cannot simply remember x^{r-1}: under partial participation it did not see round r-1.
* ``"reconstruct"`` (default): the server step gives x^{r-1} = x^r + gamma_{r-1} * g^r exactly,
  and g^r is already in the message, so the client rebuilds x^{r-1} from what it receives plus
  one float (gamma_{r-1}) in the config. Extra downlink 0 bytes; client memory: one transient
  model copy during training, nothing kept across rounds. (Agrees with "send" to float32
  rounding; tested.)
* ``"send"``: the server also sends x^{r-1} as an ArrayRecord: +1 model per client per round down.

Communication per client per round (d = model size; vectors of float32) and kept client state
-------------------------------------------------------------------------------------------------
===============  ==============================  ===========  ======================================
method           down                            up           client state kept across rounds
===============  ==============================  ===========  ======================================
FedAvg           x                   (1 d)       x_i  (1 d)   none
FedAvg-M         x, g                (2 d)       x_i  (1 d)   none
FedAvg-M-VR      x, g (+ x^{r-1})    (2 d / 3 d) x_i  (1 d)   none
SCAFFOLD         x, c                (2 d)       x_i, dc_i    c_i (trainable params only)
SCAFFOLD-M       x, g, c             (3 d)       x_i, dc_i    c_i
SCAFFOLD-M-VR    x, g, c (+ x^{r-1}) (3 d / 4 d) x_i, dc_i    c_i
===============  ==============================  ===========  ======================================

g is not sent when it is zero (round 1) or unused (beta = 1); c is not sent while it is zero
(round 1). The harness counts every array of a message, so ``bytes_down`` / ``bytes_up`` in
metrics.jsonl include these records. c_i is created on a client's first participation (absent =
zero) and is the only thing kept: no optimizer state, no model copy.

Deviations / choices: local steps are plain SGD (``client.momentum`` must be 0: a local heavy
ball would be a different algorithm); weight decay is folded into grad (so into c_i) instead of
being applied by the optimizer; K_i is the client's reported ``train_steps``, the steps it
actually took (fixed ``client.steps`` gives the paper's common K; an attack hook that skips a
batch takes no step there, and c_i averages over the same steps); BN buffers (if any) are averaged like parameters
and carry no control variate; a client whose reply is dropped as non-finite has still updated
its c_i (the server then skips its Delta c_i).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedsim.config import ConfigError
from fedsim.local import LocalAlgorithm, LocalRun, register_local_algorithm
from strategies.common import RoundUpdates, UpdateStrategy, unflatten_like

log = logging.getLogger("fedsim")

# record names (message content and client state)
G_KEY = "fedm_g"  # down: server momentum direction g^r (all float arrays of the model)
C_KEY = "scaffold_c"  # down: server control variate c^r (trainable parameters)
PREV_KEY = "fedm_prev"  # down (prev_model="send"): previous global model x^{r-1}
DC_KEY = "scaffold_dci"  # up: Delta c_i
CI_KEY = "scaffold_ci"  # client state: c_i

WEIGHTINGS = ("uniform", "num_examples")
PREV_MODES = ("reconstruct", "send")
INITS = ("zero", "first_round")


# ---------------------------------------------------------------------------------------------
# Server math (pure functions on arrays)
# ---------------------------------------------------------------------------------------------
def normalized_weights(num_examples: np.ndarray, weighting: str) -> np.ndarray:
    """Aggregation weights w_i summing to 1: 1/S ([CHWY], [SCAF]) or n_i / sum n (FedAvg)."""
    n = np.asarray(num_examples, dtype=np.float64)
    w = np.ones_like(n) if weighting == "uniform" else n
    return w / w.sum()


def mean_steps(steps: np.ndarray, weights: np.ndarray) -> float:
    """Kbar = sum_i w_i K_i: the (weighted) mean number of local steps of the round."""
    return float(np.dot(np.asarray(weights, dtype=np.float64), np.asarray(steps, dtype=np.float64)))


def momentum_estimate(updates: np.ndarray, steps: np.ndarray, lr: float, weights: np.ndarray) -> np.ndarray:
    """g^{r+1} = sum_i w_i (x^r - x_i^{r,K_i}) / (eta * Kbar), Kbar = sum_i w_i K_i
    ([CHWY] Alg. 1/2, server step: "the average of all local directions").

    ``updates`` rows are Delta_i = x_i^{r,K_i} - x^r = -eta sum_k d_i^{r,k}, so g is
    sum_i w_i sum_k d_i^{r,k} / sum_i w_i K_i: the mean over every local step of the round (each
    client's steps weighted by w_i). For a common K this is the paper's (1/(eta K S)) sum_i
    (x^r - x_i^{r,K}); for unequal K_i it does not rescale clients by 1/K_i (FedNova would).
    """
    kbar = mean_steps(steps, weights)
    if kbar <= 0:
        raise ValueError("no local step was taken this round (sum_i w_i K_i = 0): g is undefined")
    return -(np.asarray(weights, dtype=np.float64) @ updates) / (lr * kbar)


def effective_gamma(global_lr: float, lr: float, steps: np.ndarray, weights: np.ndarray) -> float:
    """gamma = global_lr * eta * Kbar, so x^{r+1} = x^r - gamma g^{r+1} = x^r + global_lr * sum_i w_i Delta_i."""
    return float(global_lr * lr * mean_steps(steps, weights))


def server_step(x: np.ndarray, g: np.ndarray, gamma: float) -> np.ndarray:
    """x^{r+1} = x^r - gamma * g^{r+1}."""
    return x - gamma * g


def control_update(c: np.ndarray, delta_c_sum: np.ndarray, num_clients: int) -> np.ndarray:
    """c^{r+1} = c^r + (1/N) sum_{i in S_r} Delta c_i  ([SCAF] Alg. 1 line 17, [CHWY] Alg. 2)."""
    return c + delta_c_sum / float(num_clients)


# ---------------------------------------------------------------------------------------------
# Client math (pure functions on tensors)
# ---------------------------------------------------------------------------------------------
def round_shift(
    beta: float, g: torch.Tensor | None, c_i: torch.Tensor | None, c: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """The part of the local direction that is constant within a round:
    (1 - beta) g^r - beta (c_i^r - c^r)   (missing terms are zero)."""
    s = torch.zeros_like(like)
    if g is not None and beta < 1.0:
        s = s + (1.0 - beta) * g
    if c_i is not None:
        s = s - beta * c_i
    if c is not None:
        s = s + beta * c
    return s


def local_direction(
    grad: torch.Tensor, shift: torch.Tensor, beta: float, grad_prev: torch.Tensor | None = None
) -> torch.Tensor:
    """d = beta * grad + shift                                    (FedAvg-M, SCAFFOLD(-M));
    d = grad - (1 - beta) * grad_prev + shift                     (VR: grad_prev = nabla F(x^{r-1}; xi)).

    With shift = (1-beta) g - beta (c_i - c) these are the table rows of the module docstring.
    """
    if grad_prev is None:
        return beta * grad + shift
    return grad - (1.0 - beta) * grad_prev + shift


# ---------------------------------------------------------------------------------------------
# Server strategies
# ---------------------------------------------------------------------------------------------
class MomentumFamily(UpdateStrategy):
    """Shared server of the family; subclasses fix ``control`` / ``vr`` and the local algorithm.

    Args:
        beta: weight of the fresh gradient in (0, 1]; 1 - beta is the weight of the momentum g.
        global_lr: dimensionless server lr; gamma = global_lr * eta * K (ignored if ``gamma``).
        gamma: the paper's global step size in gradient units (x^{r+1} = x^r - gamma g^{r+1}).
        weighting: "uniform" (1/S, the papers) or "num_examples" (Flower's FedAvg weights).
        prev_model: VR only; "reconstruct" (x^{r-1} = x^r + gamma g^r on the client) or "send".
        init_momentum: "zero" (g^0 = 0) or "first_round" (round 1 runs with beta = 1, so g^1 is a
            plain average of stochastic gradients: STORM's d_1 = grad f(x_1; xi_1)). ``None``
            picks "first_round" for the VR variants and "zero" otherwise.
        **kwargs: passed to Flower's FedAvg (fraction_train, ...).
    """

    local_algorithm = "fedavg_m"
    control = False
    vr = False

    def __init__(
        self,
        beta: float = 0.5,
        global_lr: float = 1.0,
        gamma: float | None = None,
        weighting: str = "uniform",
        prev_model: str = "reconstruct",
        init_momentum: str | None = None,
        **kwargs,
    ) -> None:
        init_momentum = init_momentum or ("first_round" if self.vr else "zero")
        if not 0.0 < float(beta) <= 1.0:
            raise ConfigError(f"strategy.beta: must be in (0, 1] (got {beta})")
        if float(global_lr) <= 0.0:
            raise ConfigError(f"strategy.global_lr: must be > 0 (got {global_lr})")
        if gamma is not None and float(gamma) <= 0.0:
            raise ConfigError(f"strategy.gamma: must be > 0 or null (got {gamma})")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"strategy.weighting: '{weighting}' is not one of {WEIGHTINGS}")
        if prev_model not in PREV_MODES:
            raise ConfigError(f"strategy.prev_model: '{prev_model}' is not one of {PREV_MODES}")
        if init_momentum not in INITS:
            raise ConfigError(f"strategy.init_momentum: '{init_momentum}' is not one of {INITS}")
        super().__init__(**kwargs)
        self.beta = float(beta)
        self.global_lr = float(global_lr)
        self.gamma = None if gamma is None else float(gamma)
        self.weighting = weighting
        self.prev_model = prev_model
        self.init_momentum = init_momentum
        self.g: np.ndarray | None = None  # g^r over all float arrays (None = 0)
        self.c: dict[str, np.ndarray] | None = None  # c^r per trainable parameter (None = 0)
        self.prev_vec: np.ndarray | None = None  # x^{r-1} (prev_model="send")
        self.last_gamma = 0.0  # gamma used for the step that produced x^r
        self.lr: float | None = None  # eta, read from the train config
        self.weight_decay: float | None = None
        self.history: list[dict[str, float]] = []  # per-round gamma, |g|, |c| (for inspection)
        self._warned_steps = False

    @property
    def _keeps_prev(self) -> bool:
        return self.vr and self.beta < 1.0 and self.prev_model == "send"

    # --- train messages ----------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
        if self.weight_decay is None:  # first round: take eta and wd from the harness config
            if float(config.get("momentum", 0.0)) != 0.0:
                raise ConfigError(
                    f"client.momentum: must be 0 with {type(self).__name__} (local steps are plain SGD "
                    f"on the corrected direction; got {config.get('momentum')})"
                )
            self.weight_decay = float(config.get("weight-decay", 0.0))
            config["weight-decay"] = 0.0  # folded into the gradient by the local algorithm
        self.lr = float(config["lr"])
        self._round_records: dict[str, ArrayRecord] = {}
        if self.g is not None and self.beta < 1.0:
            self._round_records[G_KEY] = unflatten_like(self.g, arrays)
        if self.control and self.c is not None:
            self._round_records[C_KEY] = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in self.c.items()})
        if self._keeps_prev and self.prev_vec is not None:
            self._round_records[PREV_KEY] = unflatten_like(self.prev_vec, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def round_beta(self) -> float:
        """beta for this round: 1 until the first step when ``init_momentum="first_round"``."""
        return 1.0 if self.init_momentum == "first_round" and self.g is None else self.beta

    def train_config_extra(self, server_round: int) -> dict[str, object]:
        return {
            "local-algorithm": self.local_algorithm,
            "fedm-beta": self.round_beta(),
            "fedm-weight-decay": float(self.weight_decay or 0.0),
            "fedm-prev-gamma": float(self.last_gamma) if self.prev_model == "reconstruct" else 0.0,
        }

    def extra_train_content(self, server_round: int, node_id: int) -> dict[str, ArrayRecord | ConfigRecord]:
        return dict(self._round_records)

    # --- aggregation -------------------------------------------------------------------
    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        x = self.global_vec
        if len(ru.node_ids) == 0 or x is None:
            self.last_gamma = 0.0  # no step: x^{r+1} = x^r, and the reconstruction stays exact
            self.prev_vec = x if self._keeps_prev else None
            return None
        steps = np.array(
            [float(m.content.metric_records["metrics"].get("train_steps", -1)) for m in ru.replies]
        )
        if (steps < 0).any():
            raise ValueError("a client replied without train_steps (K_i, the local steps it took)")
        w = normalized_weights(ru.num_examples, self.weighting)
        if mean_steps(steps, w) <= 0:  # nobody took a step (e.g. every batch skipped by a hook)
            log.warning("round %d: no client took a local step; the model and g are kept", server_round)
            self.last_gamma = 0.0
            self.prev_vec = x if self._keeps_prev else None
            return None
        if not self._warned_steps and steps.min() != steps.max():
            self._warned_steps = True
            log.info(
                "%s: clients took unequal local steps K_i (%d..%d in round %d); the server step is "
                "x + global_lr * mean Delta_i and g the mean over all local steps (set client.steps "
                "for the papers' common K)", type(self).__name__, steps.min(), steps.max(), server_round,
            )
        g_new = momentum_estimate(ru.updates, steps, float(self.lr), w)
        gamma = self.gamma if self.gamma is not None else effective_gamma(self.global_lr, self.lr, steps, w)
        if self.control:
            self._update_control(ru)
        self.g, self.last_gamma = g_new, gamma
        self.prev_vec = x if self._keeps_prev else None
        self.history.append(
            {
                "round": server_round,
                "gamma": gamma,
                "g_norm": float(np.linalg.norm(g_new)),
                "c_norm": float(np.sqrt(sum((v**2).sum() for v in self.c.values()))) if self.c else 0.0,
            }
        )
        return server_step(x, g_new, gamma)

    def _update_control(self, ru: RoundUpdates) -> None:
        total: dict[str, np.ndarray] = {}
        for m in ru.replies:
            rec = m.content.array_records.get(DC_KEY)
            if rec is None:
                raise ValueError(f"node {m.metadata.src_node_id} replied without {DC_KEY} (Delta c_i)")
            for k, arr in rec.items():
                a = arr.numpy().astype(np.float64)
                total[k] = total[k] + a if k in total else a
        c = self.c or {k: np.zeros_like(v) for k, v in total.items()}
        self.c = {k: control_update(c[k], total[k], self.num_clients) for k in total}

    checkpoint_attrs = ("g", "c", "prev_vec", "last_gamma", "lr", "weight_decay", "history", "dropped")  # fedsim.checkpoint


class FedAvgMomentum(MomentumFamily):
    """FedAvg-M ([CHWY] Alg. 1; = FedCM): clients use beta*grad + (1-beta)*g^r. Not Flower's
    FedAvgM (server heavy ball). See the module docstring for the equations."""

    local_algorithm = "fedavg_m"

    checkpoint_attrs = MomentumFamily.checkpoint_attrs


class ScaffoldMomentum(MomentumFamily):
    """SCAFFOLD-M ([CHWY] Alg. 2): beta*(grad - c_i + c) + (1-beta)*g^r, 1/N update of c."""

    local_algorithm = "scaffold_m"
    control = True

    checkpoint_attrs = MomentumFamily.checkpoint_attrs


class Scaffold(MomentumFamily):
    """SCAFFOLD ([SCAF] Alg. 1, option II) = SCAFFOLD-M with beta = 1; eta_g = ``global_lr``."""

    local_algorithm = "scaffold"
    control = True

    def __init__(self, global_lr: float = 1.0, gamma: float | None = None, weighting: str = "uniform", **kwargs) -> None:
        super().__init__(beta=1.0, global_lr=global_lr, gamma=gamma, weighting=weighting, init_momentum="zero", **kwargs)

    checkpoint_attrs = MomentumFamily.checkpoint_attrs


class FedAvgMomentumVR(MomentumFamily):
    """FedAvg-M-VR ([CHWY] Sec. 5, STORM-style; [UNVERIFIED]): grad + (1-beta)(g^r - grad(x^{r-1}))."""

    local_algorithm = "fedavg_m_vr"
    vr = True

    checkpoint_attrs = MomentumFamily.checkpoint_attrs


class ScaffoldMomentumVR(MomentumFamily):
    """SCAFFOLD-M-VR ([UNVERIFIED], see module docstring):
    grad - beta (c_i - c) + (1-beta)(g^r - grad(x^{r-1}))."""

    local_algorithm = "scaffold_m_vr"
    control = True
    vr = True

    checkpoint_attrs = MomentumFamily.checkpoint_attrs


# ---------------------------------------------------------------------------------------------
# Client local algorithms
# ---------------------------------------------------------------------------------------------
def _tensors(rec: ArrayRecord | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    if rec is None:
        return None
    return {k: torch.from_numpy(np.array(a.numpy(), dtype=np.float32)).to(device) for k, a in rec.items()}


class MomentumLocal(LocalAlgorithm):
    """Client half of the family: rewrites ``p.grad`` into the direction d before each SGD step
    (so the optimizer's ``p -= eta * p.grad`` is the paper's local step) and, for the
    control-variate methods, averages the raw gradients into c_i^{r+1}."""

    control = False
    vr = False

    def on_start(self, run: LocalRun) -> None:
        cfg, dev = run.config, run.device
        self.beta = float(cfg.get("fedm-beta", 1.0))
        self.wd = float(cfg.get("fedm-weight-decay", 0.0))
        arrays = run.content.array_records
        g = _tensors(arrays.get(G_KEY), dev)
        c = _tensors(arrays.get(C_KEY), dev) if self.control else None
        c_i = _tensors(run.state.array_records.get(CI_KEY), dev) if self.control else None
        self.names = [n for n, _ in run.params()]
        self.shift = {
            n: round_shift(
                self.beta,
                None if g is None else g[n],
                None if c_i is None else c_i[n],
                None if c is None else c[n],
                p.detach(),
            )
            for n, p in run.params()
        }
        self.c_i = c_i
        self.grad_sum = {n: torch.zeros_like(p) for n, p in run.params()} if self.control else None
        self.seen = 0
        self.prev = self._previous_model(run, g) if self.vr and self.beta < 1.0 else None

    def _previous_model(self, run: LocalRun, g: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """x^{r-1} as a functional state dict: sent, or rebuilt as x^r + gamma_{r-1} g^r."""
        sent = _tensors(run.content.array_records.get(PREV_KEY), run.device)
        gamma_prev = float(run.config.get("fedm-prev-gamma", 0.0))
        out: dict[str, torch.Tensor] = {}
        for k, v in run.global_params.items():
            if not v.is_floating_point():
                out[k] = v.clone()
            elif sent is not None:
                out[k] = sent[k].to(v.dtype)
            elif g is not None and gamma_prev != 0.0:
                out[k] = v + gamma_prev * g[k].to(v.dtype)
            else:  # round 1 (x^{-1} := x^0) or no step last round
                out[k] = v.clone()
        for n in self.names:
            out[n] = out[n].detach().requires_grad_(True)
        return out

    def _grads_at_previous(self, run: LocalRun) -> dict[str, torch.Tensor]:
        """nabla F(x^{r-1}; xi) on the step's minibatch (same loss, l2 term included)."""
        xb, yb = run.batch
        out = torch.func.functional_call(run.model, self.prev, (xb,))
        loss = run.loss_fn(out, yb)
        leaves = [self.prev[n] for n in self.names]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        res = {}
        for n, leaf, gr in zip(self.names, leaves, grads):
            gr = torch.zeros_like(leaf) if gr is None else gr
            res[n] = gr + self.wd * leaf.detach() if self.wd else gr
        return res

    def on_backward(self, run: LocalRun) -> None:
        grads_prev = self._grads_at_previous(run) if self.prev is not None else None
        for n, p in run.params():
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            if self.wd:
                grad = grad + self.wd * p.detach()
            if self.grad_sum is not None:
                self.grad_sum[n] += grad
            gp = None if grads_prev is None else grads_prev[n]
            p.grad = local_direction(grad, self.shift[n], self.beta, gp)
        self.seen += 1

    def on_end(self, run: LocalRun, reply: RecordDict) -> None:
        if self.grad_sum is not None:
            old = self.c_i
            if self.seen > 0:  # c_i^{r+1} = mean of the raw gradients of the steps taken
                new_ci = {n: (s / self.seen).detach().cpu() for n, s in self.grad_sum.items()}
            else:  # no step taken (every batch skipped): nothing observed, c_i unchanged
                new_ci = {n: (old[n].cpu() if old is not None else torch.zeros_like(s).cpu()) for n, s in
                          self.grad_sum.items()}
            delta = {n: v - (old[n].cpu() if old is not None else 0.0) for n, v in new_ci.items()}
            run.state[CI_KEY] = ArrayRecord(torch_state_dict=new_ci)
            reply[DC_KEY] = ArrayRecord(torch_state_dict=delta)
        self.shift = self.grad_sum = self.prev = self.c_i = None  # nothing kept beyond c_i


@register_local_algorithm("fedavg_m")
class FedAvgMomentumLocal(MomentumLocal):
    """FedAvg-M local steps (no client state)."""


@register_local_algorithm("scaffold")
class ScaffoldLocal(MomentumLocal):
    """SCAFFOLD local steps (beta = 1 is sent by the server); keeps c_i."""

    control = True


@register_local_algorithm("scaffold_m")
class ScaffoldMomentumLocal(MomentumLocal):
    """SCAFFOLD-M local steps; keeps c_i."""

    control = True


@register_local_algorithm("fedavg_m_vr")
class FedAvgMomentumVRLocal(MomentumLocal):
    """FedAvg-M-VR local steps: one extra gradient at x^{r-1} per step (no client state)."""

    vr = True


@register_local_algorithm("scaffold_m_vr")
class ScaffoldMomentumVRLocal(MomentumLocal):
    """SCAFFOLD-M-VR local steps; keeps c_i."""

    control = True
    vr = True


__all__ = [
    "FedAvgMomentum",
    "Scaffold",
    "ScaffoldMomentum",
    "FedAvgMomentumVR",
    "ScaffoldMomentumVR",
    "MomentumFamily",
    "MomentumLocal",
    "momentum_estimate",
    "effective_gamma",
    "mean_steps",
    "server_step",
    "control_update",
    "round_shift",
    "local_direction",
    "normalized_weights",
]


# ---------------------------------------------------------------------------------------------
# Batched form (engine=batched, engine.batched=true): the same local direction on [clients, ...]
# ---------------------------------------------------------------------------------------------
from fedsim.batched import BatchedLocal, BatchedStep, register_batched  # noqa: E402


@register_batched(
    FedAvgMomentumLocal, ScaffoldLocal, ScaffoldMomentumLocal, FedAvgMomentumVRLocal, ScaffoldMomentumVRLocal
)
class MomentumLocalBatched(BatchedLocal):
    """:class:`MomentumLocal` on stacked tensors. Each client's own ``MomentumLocal`` computes
    its round constants (shift = (1-beta) g - beta (c_i - c), x^{r-1} for VR) in ``on_start`` and
    writes c_i / Delta c_i in ``on_end``; per step, every client's direction d (module table,
    :func:`local_direction`) and raw-gradient sum are computed at once, masked clients left out."""

    def on_start(self) -> None:
        super().on_start()
        algos = [j.algo for j in self.jobs]
        self.shift = {n: torch.stack([a.shift[n] for a in algos]) for n in self.names}
        self.beta = self.col([a.beta for a in algos])
        self.wd = self.col([a.wd for a in algos])
        self.control = algos[0].control
        self.grad_sum = {n: torch.zeros_like(s) for n, s in self.shift.items()} if self.control else None
        self.seen = torch.zeros(len(algos), dtype=torch.long, device=self.device)
        # VR: x^{r-1} per client (its global model where beta = 1: there (1 - beta) = 0 drops the term)
        if algos[0].vr and any(a.prev is not None for a in algos):
            self.prev = {
                n: torch.stack([(a.prev[n] if a.prev is not None else j.global_sd[n]).detach() for a, j in zip(algos, self.jobs)])
                for n in self.names
            }
        else:
            self.prev = None

    def on_grads(self, step: BatchedStep, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        grads_prev = step.grads_of(self.prev) if self.prev is not None else None
        act = step.active
        any_wd = bool((self.wd != 0).any())
        out = {}
        for n in self.names:
            p, g = step.params[n], grads[n]
            view = (-1,) + (1,) * (p.dim() - 1)
            if any_wd:
                g = g + self.wd.view(view) * p
            if self.grad_sum is not None:
                self.grad_sum[n] += torch.where(act.view(view), g, 0.0)
            gp = None
            if grads_prev is not None:
                gp = grads_prev[n] + self.wd.view(view) * self.prev[n] if any_wd else grads_prev[n]
            out[n] = local_direction(g, self.shift[n], self.beta.view(view), gp)
        self.seen += act.long()
        return out

    def on_end(self, replies: list[RecordDict]) -> None:
        for c, a in enumerate(j.algo for j in self.jobs):
            a.seen = int(self.seen[c])
            if self.grad_sum is not None:
                a.grad_sum = {n: s[c] for n, s in self.grad_sum.items()}
        super().on_end(replies)
