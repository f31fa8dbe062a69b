"""``vpr eval recall`` with models that have extra heads: a SelaVPR++ hash head's own codes in a
binary index (Hamming order only, or Hamming candidates re-ranked by float), and CQVPR's local
features re-ranking the global top N by mutual nearest neighbours. Each ranking is checked
against a plain numpy reference computed from the encoder's own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vpr_ros.cli import main
from vpr_ros.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SUBSET = "0.6:0.605"  # 18 held-out places: winter queries against the summer database


def _model_dir(tmp: Path, name: str) -> Path:
    """A random-head model directory at the Nordland recipes' test size (112 x 224)."""
    from vpr_ros.models.model_dir import create_model_dir

    data = yaml.safe_load((REPO / "config" / "models" / f"{name}.yaml").read_text())
    data["input"]["size"] = [112, 224]
    data["weights"] = {"backbone": "package"}
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    create_model_dir(cfg, tmp / name)
    return tmp / name


@pytest.fixture(scope="module")
def sela(nordland_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from vpr_ros.eval.tasks import encode_eval

    d = _model_dir(tmp_path_factory.mktemp("heads"), "selavpr_effnetlite0")
    ev = encode_eval(d, "nordland:summer", "nordland:winter", tolerance=1, subset=SUBSET,
                     extras=("binary",), progress=False, backend="torch")
    return d, ev


@pytest.fixture(scope="module")
def cqvpr(nordland_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from vpr_ros.eval.tasks import encode_eval

    d = _model_dir(tmp_path_factory.mktemp("heads"), "cqvpr_effnetlite0")
    ev = encode_eval(d, "nordland:summer", "nordland:winter", tolerance=1, subset=SUBSET,
                     extras=("local",), progress=False, backend="torch")
    return d, ev


def _hamming(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    return np.unpackbits(q[:, None, :] ^ db[None], axis=2).sum(axis=2)


def test_binary_index_searches_the_models_own_codes(sela) -> None:
    from vpr_ros.datasets.images import read_rgb
    from vpr_ros.eval.search_plan import plan_search
    from vpr_ros.eval.tasks import recall_from_encoded

    _, ev = sela
    # the set encoding kept the hash head's codes, unchanged
    direct = ev.encoder.encode_all([read_rgb(p) for p in ev.db.paths[:3]])
    np.testing.assert_array_equal(ev.db_enc.binary[:3], direct["binary"])
    plan = plan_search(ev.encoder.output_names, "binary", rerank=0)
    res = recall_from_encoded(ev, plan, ks=(1, 5, 10))
    assert res["search"]["binary"] == {"codes": "model", "bits": 512, "rerank": 0}
    assert res["search"]["descriptor_bytes"]["total"] == 64
    ids = _ranked(ev, plan, 10)
    ham = _hamming(ev.q_enc.binary, ev.db_enc.binary)
    # Hamming order of the model codes (ties may come in either order); SimHash codes of the
    # float descriptors would give other distances
    np.testing.assert_array_equal(np.take_along_axis(ham, ids, 1), np.sort(ham, 1)[:, :10])
    _check_recall(res, ids, ev.positives)


def test_rerank_n_reranks_the_hamming_candidates_by_float(sela) -> None:
    from vpr_ros.eval.search_plan import plan_search

    _, ev = sela
    ham = _hamming(ev.q_enc.binary, ev.db_enc.binary)
    float_scores = ev.q_enc.global_ @ ev.db_enc.global_.T
    n, k = 8, 5
    ids = _ranked(ev, plan_search(ev.encoder.output_names, "binary", rerank=n), k)
    for r in range(len(ids)):
        d_n = np.sort(ham[r])[n - 1]
        loose, strict = set(np.flatnonzero(ham[r] <= d_n)), set(np.flatnonzero(ham[r] < d_n))
        got = [int(i) for i in ids[r]]
        assert set(got) <= loose
        s = float_scores[r, got]
        assert np.all(np.diff(s) <= 1e-6)                      # sorted by float score
        assert {i for i in strict if float_scores[r, i] > s[-1] + 1e-6} <= set(got)
    hamming_only = _ranked(ev, plan_search(ev.encoder.output_names, "binary", rerank=0), k)
    assert not np.array_equal(ids, hamming_only)
    # re-ranking every candidate gives the exact float ranking
    every = _ranked(ev, plan_search(ev.encoder.output_names, "binary", rerank=100), k)
    flat = _ranked(ev, plan_search(ev.encoder.output_names, "flat"), k)
    np.testing.assert_array_equal(every, flat)


def _ranked(ev, plan, k: int) -> np.ndarray:
    from vpr_ros.eval.search_plan import search_encoded

    return search_encoded(ev.db_enc, ev.q_enc, ev.encoder.fingerprint, k, plan)[0]


def _check_recall(res: dict, ids: np.ndarray, positives) -> None:
    for k in (1, 5, 10):
        hits = [np.isin(ids[r, :k], positives[r]).any() for r in range(len(ids))]
        assert res["recall"][f"R@{k}"] == pytest.approx(np.mean(hits), abs=1e-6)


def test_local_rerank_follows_mutual_nn_counts(cqvpr) -> None:
    from vpr_ros.datasets.images import read_rgb
    from vpr_ros.eval.search_plan import plan_search
    from vpr_ros.eval.tasks import recall_from_encoded
    from vpr_ros.models.rerank import mutual_nn_count

    _, ev = cqvpr
    top, k = 10, 10
    plan = plan_search(ev.encoder.output_names, "flat", local_rerank=True, local_rerank_top=top)
    res = recall_from_encoded(ev, plan, ks=(1, 5, 10))
    assert res["search"]["local_rerank"] == {"method": "mutual_nn", "top_n": top}
    local_bytes = int(np.prod(ev.db_enc.local.shape[1:])) * 4
    assert res["search"]["descriptor_bytes"] == {"global": 1536 * 4, "local": local_bytes,
                                                 "total": 1536 * 4 + local_bytes}
    ids = _ranked(ev, plan, k)
    glob = _ranked(ev, plan_search(ev.encoder.output_names, "flat"), k)
    # reference: local features straight from the encoder, mutual-NN counts, stable sort
    db_local = ev.encoder.encode_all([read_rgb(p) for p in ev.db.paths])["local"]
    q_local = ev.encoder.encode_all([read_rgb(p) for p in ev.q.paths])["local"]
    for r in range(len(ids)):
        counts = np.array([mutual_nn_count(q_local[r], db_local[c]) for c in glob[r]])
        np.testing.assert_array_equal(ids[r], glob[r][np.argsort(-counts, kind="stable")])
    assert not np.array_equal(ids, glob)  # the re-ranking changed some rankings
    _check_recall(res, ids, ev.positives)


def test_cli_reports_codes_and_rerank(sela, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    d, ev = sela
    args = ["eval", "recall", "--model", str(d), "--database", "nordland:summer", "--queries",
            "nordland:winter", "--tolerance", "1", "--subset", SUBSET, "--k", "1,5,10",
            "--no-progress", "--index", "binary", "--backend", "torch"]
    assert main([*args, "--rerank", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["search"]["binary"]["codes"] == "model" and res["model"]["outputs"] == [
        "global", "binary"]
    from vpr_ros.eval.search_plan import plan_search
    from vpr_ros.eval.tasks import recall_from_encoded

    same = recall_from_encoded(ev, plan_search(ev.encoder.output_names, "binary", rerank=0),
                               ks=(1, 5, 10))
    assert res["recall"] == same["recall"]
    assert main(args) == 0  # default: top 100 re-ranked by float, said in the text line
    assert "512-bit model codes, top 100 re-ranked by float, 4160 B/image" in \
        capsys.readouterr().out


def test_options_a_model_cannot_honour_are_refused(sela, effnet_gem_model_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.eval.search_plan import plan_search

    d, _ = sela
    base = ["eval", "recall", "--database", "nordland:summer", "--queries", "nordland:winter",
            "--tolerance", "1", "--subset", SUBSET, "--no-progress"]
    assert main([*base, "--model", str(d), "--local-rerank"]) == 2
    assert "no 'local' local-feature head" in capsys.readouterr().err
    assert main([*base, "--model", str(effnet_gem_model_dir), "--rerank", "5"]) == 2
    assert "it needs --index binary" in capsys.readouterr().err
    with pytest.raises(InputError, match="expected an integer >= 0"):
        plan_search(("global", "binary"), "binary", rerank=-1)
    with pytest.raises(InputError, match="expected an integer >= 1"):
        plan_search(("global", "local"), "flat", local_rerank=True, local_rerank_top=0)
    # a model without a hash head keeps the index's own codes of the float descriptor
    plan = plan_search(("global",), "binary")
    assert plan.binary_codes == "descriptor" and plan.extras == ()
