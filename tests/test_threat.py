"""The threat model: schema and validation, assignment, scoring math, colluding hook, NaN safety,
and MUD-HoG's effect in a small fixed-seed experiment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from threadpoolctl import threadpool_limits

from attacks.base import ReplyTransform
from fedsim import threat
from fedsim.compose import compose_config
from fedsim.config import ConfigError, to_container, validate
from strategies.common import RoundUpdates, UpdateStrategy

ONE_THREAD = ["client.num_threads=1"]


@pytest.fixture(autouse=True)
def _blas_one_thread():
    """Server-side numpy / scikit-learn on one BLAS thread (fast on a busy box)."""
    with threadpool_limits(limits=1):
        yield


# --- schema and validation --------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,key",
    [
        (["threat=signflip", "threat.groups.0.fraction=1.5"], "threat.groups[0].fraction"),
        (["threat=signflip", "threat.groups.0.ids=[1]"], "threat.groups[0]"),  # both fraction and ids
        (["threat=signflip", "threat.groups.0.fraction=null"], "threat.groups[0]"),  # neither
        (["threat=signflip", "threat.groups.0.fraction=null", "threat.groups.0.ids=[3,99]"], "threat.groups[0].ids"),
        (["threat=signflip", "threat.groups.0.kind=evil"], "threat.groups[0].kind"),
        (["threat=signflip", "threat.groups.0.attack=null"], "threat.groups[0].attack"),
        (["threat=signflip", "threat.groups.0.attack._target_=attacks.update.Nope"], "threat.groups[0].attack._target_"),
        (["threat=signflip", "+threat.groups.0.attack.scal=2"], "threat.groups[0].attack.scal"),
        (["threat=signflip", "threat.groups.0.attack._target_=fedsim.models.MLP", "~threat.groups.0.attack.scale"],
         "threat.groups[0].attack._target_"),
        (["threat=alie", "threat.groups.0.kind=unreliable"], "threat.groups[0].attack"),
        (["threat=mudhog_mix", "threat.groups.1.name=signflip"], "threat.groups[1].name"),
        (["threat=mudhog_mix", "threat.groups.0.fraction=0.9"], "threat.groups"),
    ],
)
def test_bad_threat_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert str(err.value).startswith(key), str(err.value)


def test_threat_typo_rejected_by_schema():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["threat=signflip", "threat.groups.0.fracton=0.2"])
    assert "fracton" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "name", ["none", "signflip", "noise", "labelflip", "multilabelflip", "unreliable", "mudhog_mix", "alie", "ipm",
             "minmax", "nonfinite"],
)
def test_every_threat_config_validates(name):
    validate(compose_config([f"threat={name}", "num_clients=40"]))


def test_assignment_is_seeded_disjoint_and_sized():
    cfg = compose_config(["threat=mudhog_mix", "num_clients=40"]).threat
    a = threat.assign(cfg, 40, seed=0)
    assert a == threat.assign(cfg, 40, seed=0) and a != threat.assign(cfg, 40, seed=1)
    counts = {g: sum(v == g for v in a.values()) for g in set(a.values())}
    assert counts == {"signflip": 5, "noise": 6, "labelflip": 4, "multilabelflip": 4, "unreliable": 4}
    malicious = [p for p, g in a.items() if threat.group_kinds(cfg)[g] == "malicious"]
    assert len(malicious) / 40 == 0.475
    explicit = compose_config(["threat=signflip", "threat.groups.0.fraction=null", "threat.groups.0.ids=[0,10,11]"])
    assert threat.assign(explicit.threat, 40, 0) == {0: "signflip", 10: "signflip", 11: "signflip"}


def test_client_attack_by_partition():
    cfg = to_container(compose_config(["threat=mudhog_mix", "num_clients=40"]))["threat"]
    a = threat.assign(cfg, 40, 0)
    kinds = {type(threat.client_attack(cfg, p, 40, 0)).__name__ for p in a}
    assert kinds == {"SignFlip", "GaussianNoise", "LabelFlip", "MultiLabelFlip", "Unreliable"}
    benign = next(p for p in range(40) if p not in a)
    assert threat.client_attack(cfg, benign, 40, 0) is None
    alie = to_container(compose_config(["threat=alie", "num_clients=10"]))["threat"]
    member = next(iter(threat.assign(alie, 10, 0)))
    assert threat.client_attack(alie, member, 10, 0) is None  # colluders train honestly


# --- scoring math ------------------------------------------------------------------------------
def test_detection_scores_by_hand():
    truth = {0: "sf", 1: "sf", 2: "lf", 3: "mlf", 4: "ur"}
    kinds = {"sf": "malicious", "lf": "malicious", "mlf": "malicious", "ur": "unreliable"}
    labels = {"sf": ["signflip"], "lf": ["targeted"], "mlf": ["targeted"], "ur": ["unreliable"]}
    flags = {0: "signflip", 2: "targeted", 3: "noise", 4: "unreliable", 5: "targeted", 6: "unreliable"}
    s = threat.detection_scores(truth, kinds, labels, flags, universe=range(8))
    # malicious {0,1,2,3}; flagged malicious (not "unreliable") {0,2,3,5}
    assert (s["tp"], s["fp"], s["fn"]) == (3, 1, 1)
    assert s["precision"] == 0.75 and s["recall"] == 0.75 and s["f1"] == 0.75
    assert s["by_label"]["targeted"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5}  # {2,5} vs {2,3}
    assert s["by_label"]["signflip"]["recall"] == 0.5 and s["by_label"]["signflip"]["precision"] == 1.0
    assert s["by_label"]["unreliable"] == {"precision": 0.5, "recall": 1.0, "f1": 2 / 3}
    assert s["by_group"]["mlf"] == {"n": 1, "recall": 0.0, "caught": 1.0}  # caught, wrong type
    # only the universe counts; nothing flagged: precision undefined, recall 0
    s2 = threat.detection_scores(truth, kinds, labels, {}, universe=[0, 1, 7])
    assert s2["precision"] is None and s2["recall"] == 0.0 and s2["f1"] == 0.0
    assert s2["by_group"]["lf"]["recall"] is None
    row = threat.flat_scores(s)
    assert row["det_precision"] == 0.75 and row["det_targeted_f1"] == 0.5 and row["det_group_sf_recall"] == 0.5
    table = threat.confusion_table(truth, flags, range(8))
    assert table["benign"] == {"targeted": 1, "unreliable": 1, "none": 1} and table["sf"] == {"signflip": 1, "none": 1}


# --- end to end: ground truth, detection rows, colluding replies, NaN --------------------------
def test_mudhog_run_records_ground_truth_and_detection(run):
    summary, rows, run_dir = run("threat=mudhog_mix", "strategy=mudhog", "strategy.tau0=1", "strategy.delay=1",
                                 "num_clients=10", "participation=full", *ONE_THREAD)
    gt = summary["threat"]
    assert sum(len(g["ids"]) for g in gt["groups"].values()) == len(gt["assignment"]) == 6
    assert gt["groups"]["labelflip"]["detect_as"] == ["targeted"]
    # every round's scores, recomputed by hand from the round's flags and the ground truth
    owner = {int(p): g for p, g in gt["assignment"].items()}
    malicious = {p for p, g in owner.items() if gt["groups"][g]["kind"] == "malicious"}
    assert malicious == {3, 5, 6, 7, 8}  # seed 0: signflip 3, noise 5 and 8, mlf 6, lf 7
    for r in rows:
        flags = {int(p): lab for p, lab in r["flagged"].items()}
        flagged_mal = {p for p, lab in flags.items() if lab != "unreliable"}
        tp, fp, fn = len(flagged_mal & malicious), len(flagged_mal - malicious), len(malicious - flagged_mal)
        assert (r["det_tp"], r["det_fp"], r["det_fn"]) == (tp, fp, fn)
        assert r["det_precision"] == (tp / (tp + fp) if tp + fp else None)
        assert r["det_recall"] == pytest.approx(tp / (tp + fn))
        for g in ("signflip", "noise", "labelflip"):
            ids = gt["groups"][g]["ids"]
            right = [p for p in ids if flags.get(p) in gt["groups"][g]["detect_as"]]
            assert r[f"det_group_{g}_recall"] == pytest.approx(len(right) / len(ids)), (g, r)
    assert rows[0]["flagged"] == {} and rows[0]["det_recall"] == 0.0  # tau0 = 1: no decision in round 1
    assert rows[-1]["det_signflip_recall"] == 1.0 and rows[-1]["det_tp"] >= 2  # caught by round 3
    conf = summary["detection"]["confusion"]
    assert sum(sum(v.values()) for v in conf.values()) == 10
    last = {int(p): lab for p, lab in rows[-1]["flagged"].items()}
    assert conf["signflip"] == {"signflip": 1} and last[3] == "signflip"
    plain, rows2, _ = run("threat=mudhog_mix", "num_clients=10", *ONE_THREAD, name="fedavg")
    assert "threat" in plain and "detection" not in plain and "det_precision" not in rows2[0]


class Recording(UpdateStrategy):
    """Test strategy: FedAvg's mean, remembering every round's updates by partition."""

    seen: list[dict[int, np.ndarray]] = []

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        Recording.seen.append({self.node_to_pid[n]: u for n, u in zip(ru.node_ids, ru.updates)})
        return self.global_vec + ru.updates.mean(0)


def test_colluding_ipm_replies_are_rewritten_before_the_strategy(run):
    Recording.seen = []
    summary, rows, _ = run("threat=ipm", "threat.groups.0.fraction=0.5", "threat.groups.0.attack.epsilon=2.0",
                           f"strategy._target_={__name__}.Recording", "participation=full", *ONE_THREAD)
    mal = {int(p) for p in summary["threat"]["assignment"]}
    assert len(mal) == 2 and len(Recording.seen) == 3
    for upd in Recording.seen:
        benign_mean = np.mean([u for p, u in upd.items() if p not in mal], axis=0)
        for p in mal:
            assert np.allclose(upd[p], -2.0 * benign_mean, atol=1e-6)
    assert all(r["replied"] == 4 and r["failed"] == 0 for r in rows)


class NaNCollusion(ReplyTransform):
    """Test attack: colluders send NaN (the hook must drop it)."""

    def apply(self, benign, malicious, rng):
        return [torch.full_like(m, math.nan) for m in malicious]


@pytest.mark.parametrize(
    "strategy", ["fedavg", "mudhog", "geomed", "foolsgold", "fedmedian", "multikrum", "fedtrimmedavg"],
)
def test_nonfinite_updates_are_never_averaged_in(run, strategy):
    collude = strategy in ("geomed", "fedavg")  # the hook path (server side) for two of them
    attack = [f"threat.groups.0.attack._target_={__name__}.NaNCollusion", "~threat.groups.0.attack.value"] if collude else []
    # 4 clients: Multi-Krum's preset (f=2, m=8) needs n > 2f+2 = 6, which validation now refuses
    krum = ["strategy.num_malicious_nodes=0", "strategy.num_nodes_to_select=2"] if strategy == "multikrum" else []
    summary, rows, run_dir = run("threat=nonfinite", "threat.groups.0.fraction=0.5", *attack, f"strategy={strategy}",
                                 "participation=full", *krum, *ONE_THREAD)
    assert all(r["nonfinite"] == 2 and r["replied"] == 2 and r["failed"] == 2 for r in rows)
    assert all(math.isfinite(r["test_loss"]) for r in rows)
    state = torch.load(run_dir / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert summary["final_accuracy"] > 0.2


def test_update_strategy_drops_nonfinite_rows_itself():
    """Second line of defense: UpdateStrategy.collect on replies a grid did not filter."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedsim.engines.base import set_server_identity
    from strategies.robust import GeoMed

    set_server_identity()
    s = GeoMed()
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    s.global_arrays, s.global_vec = arrays, np.zeros(3)
    s.node_to_pid = {1: 0, 2: 1}

    def reply(node, vals):
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(vals, dtype=np.float32))}),
                              "metrics": MetricRecord({"num-examples": 1})})
        m = Message(content, dst_node_id=node, message_type="train")
        m.metadata.__dict__["_src_node_id"] = node
        return m

    ru = s.collect(1, [reply(1, [1.0, 1.0, 1.0]), reply(2, [np.nan, 0.0, 0.0])])
    assert ru.node_ids == [1] and s.dropped[1] == [2]


# --- science: MUD-HoG's effect on a small fixed-seed experiment --------------------------------
def test_mudhog_detects_signflip_and_noise_and_beats_fedavg(run):
    """MUD-HoG's mixture (47.5 % malicious + 10 % unreliable) on digits, 20 IID clients, 8 rounds:
    sign-flip and additive-noise clients are found (recall >= 0.9) and MUD-HoG ends more
    accurate than FedAvg under the same attack."""
    common = ["threat=mudhog_mix", "num_clients=20", "rounds=8", "client.epochs=2", "participation=full", *ONE_THREAD]
    mud, _, _ = run(*common, "strategy=mudhog", "strategy.preset=digits", name="mudhog")
    avg, _, _ = run(*common, "strategy=fedavg", name="fedavg")
    groups = mud["detection"]["by_group"]
    assert groups["signflip"]["recall"] >= 0.9 and groups["noise"]["recall"] >= 0.9
    assert mud["detection"]["precision"] >= 0.9
    assert mud["final_accuracy"] > avg["final_accuracy"] + 0.05
