"""``vpr eval zoo`` end to end on a shortened budget: the SelaVPR++ recipe (three variants)
trained 3 steps on 16 places and the two untrained baselines, evaluated on 11 held-out places
(CQVPR's local re-rank variant is the same code, checked in test_eval_recall_heads.py; here only
its place in the table). Checks the table and JSON, that a second call reuses the finished runs, that a
run of other overrides is refused, and that a row is exactly what ``vpr eval recall`` reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpr_ros.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = [str(REPO / "config" / "train" / f"{n}_effnetlite0_nordland.yaml")
           for n in ("selavpr",)]
SHORT = ["data.train.0.split=[0.0, 0.0045]", "data.train.0.places_per_batch=16",
         "feature_cache.variants=1", "augment.randaugment=null", "scheduler.warmup=0",
         "trainer.max_steps=3", "trainer.progress_bar=false",
         "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1"]
SUBSET = "0.6:0.603"
N_HELD_OUT = round(0.603 * 3576) - round(0.6 * 3576)


def _args(runs: Path, out: Path, sets: list[str], subset: str = SUBSET) -> list[str]:
    return ["eval", "zoo", "--runs-dir", str(runs), "-o", str(out), "--recipes", *RECIPES,
            "--subset", subset, "--no-progress", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def zoo(nordland_root: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("zoo")
    assert main(_args(base / "runs", base / "out", SHORT)) == 0
    return base, json.loads((base / "out" / "results.json").read_text())


def test_table_and_json(zoo, capsys: pytest.CaptureFixture) -> None:
    base, doc = zoo
    got = [(r["method"], r["variant"]) for r in doc["rows"]]
    assert got == [("GeM (none (pretrained backbone))", "float"),
                   ("QAA (untrained head)", "float"),
                   ("SelaVPR++", "float"), ("SelaVPR++", "binary (Hamming only)"),
                   ("SelaVPR++", "binary + float re-rank 100")]
    steps = [r["steps"] for r in doc["rows"]]
    assert steps == [0, 0, 3, 3, 3]
    assert doc["rows"][0]["train_wall_s"] is None and doc["rows"][2]["train_wall_s"] > 0
    by = {(r["method"], r["variant"]): r for r in doc["rows"]}
    assert by[("SelaVPR++", "binary (Hamming only)")]["descriptor_bytes"] == {"binary": 64,
                                                                              "total": 64}
    assert by[("SelaVPR++", "binary + float re-rank 100")]["eval"]["search"]["binary"] == {
        "codes": "model", "bits": 512, "rerank": 100}
    assert by[("GeM (none (pretrained backbone))", "float")]["descriptor_bytes"]["total"] == \
        1280 * 4
    for r in doc["rows"]:
        rec = r["recall"]
        assert set(rec) == {"R@1", "R@5", "R@10"} and 0 <= rec["R@1"] <= rec["R@5"] <= \
            rec["R@10"] <= 1
        assert r["eval"]["num_queries"] == r["eval"]["num_database"] == N_HELD_OUT
        assert r["eval"]["ground_truth"] == "index tolerance +-1"
    assert doc["split"] == {"database": "nordland:summer", "queries": "nordland:winter",
                            "subset": SUBSET, "tolerance": 1}
    table = (base / "out" / "table.md").read_text().splitlines()
    assert table[0] == ("| method | variant | R@1 | R@5 | R@10 | bytes / image | trained steps "
                        "| training wall time |")
    assert len(table) == 2 + len(doc["rows"])
    assert "| SelaVPR++ | binary (Hamming only) |" in table[5] and "| 64 | 3 |" in table[5]
    # the feature cache is shared: one folder for every run
    assert list((base / "runs" / "feature_cache").glob("features-*.pt"))
    assert not any((base / "runs").glob("*/cache"))


def test_rerun_reuses_finished_runs_and_refuses_other_overrides(
        zoo, capsys: pytest.CaptureFixture) -> None:
    base, doc = zoo
    summary = base / "runs" / "selavpr_effnetlite0_nordland" / "train_summary.json"
    before = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_args(base / "runs", base / "out2", SHORT, subset="0.6:0.602")) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 2 and "training (" not in out
    assert summary.stat().st_mtime_ns == before
    again = json.loads((base / "out2" / "results.json").read_text())
    assert all(r["reused_run"] for r in again["rows"])
    assert [r["fingerprint"] for r in again["rows"]] == [r["fingerprint"] for r in doc["rows"]]
    # other overrides: refused, nothing retrained
    assert main(_args(base / "runs", base / "out3", [*SHORT, "optimizer.lr=1.0e-3"])) == 2
    assert "holds a run of another recipe or other overrides" in capsys.readouterr().err
    assert summary.stat().st_mtime_ns == before


def test_a_row_is_what_vpr_eval_recall_reports(zoo, capsys: pytest.CaptureFixture) -> None:
    _, doc = zoo
    capsys.readouterr()
    for variant, extra in (("binary (Hamming only)", ["--index", "binary", "--rerank", "0"]),
                           ("float", [])):
        row = next(r for r in doc["rows"] if r["method"] == "SelaVPR++"
                   and r["variant"] == variant)
        assert main(["eval", "recall", "--model", row["model_dir"], "--backend", "torch",
                     "--database",
                     "nordland:summer", "--queries", "nordland:winter", "--tolerance", "1",
                     "--subset", SUBSET, "--k", "1,5,10", "--no-progress", "--json",
                     *extra]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["recall"] == row["recall"]
        assert res["search"] == row["eval"]["search"]


def test_variants_of_each_head() -> None:
    from vpr_ros.eval.zoo import variants

    def names(outputs):
        return [(v, p.index, p.binary_codes, p.rerank, p.local_rerank_top)
                for v, p in variants(outputs, 100)]

    assert names(("global",)) == [("float", "flat", None, None, None)]
    assert names(("global", "binary")) == [
        ("float", "flat", None, None, None),
        ("binary (Hamming only)", "binary", "model", 0, None),
        ("binary + float re-rank 100", "binary", "model", 100, None)]
    assert names(("global", "local")) == [
        ("float", "flat", None, None, None),
        ("float + local re-rank 100", "flat", None, None, 100)]


def test_rows_come_from_cached_backbone_features_reused_on_a_rerun(
        zoo, capsys: pytest.CaptureFixture) -> None:
    base, doc = zoo
    # GeM and the SelaVPR++ recipe share the frozen head-conv backbone: one held-out entry,
    # computed once; the untrained QAA baseline (the QAA recipe cuts the trunk after stage 4)
    # is alone on its backbone and encoded in full
    by_method = {r["method"]: r["backbone_features"] for r in doc["rows"]}
    assert by_method.pop("QAA (untrained head)") == "encoded"
    assert set(by_method.values()) == {"cached"}
    [entry] = doc["heldout_feature_cache"]
    assert not entry["reused"] and Path(entry["file"]).is_file()
    assert Path(entry["file"]).parent == base / "runs" / "feature_cache"
    capsys.readouterr()
    assert main(_args(base / "runs", base / "out4", SHORT)) == 0
    again = json.loads((base / "out4" / "results.json").read_text())
    assert [e["digest"] for e in again["heldout_feature_cache"]] == [entry["digest"]]
    assert again["heldout_feature_cache"][0]["reused"]
    assert [r["recall"] for r in again["rows"]] == [r["recall"] for r in doc["rows"]]
    # and full encoding gives the same table
    assert main([*_args(base / "runs", base / "out5", SHORT), "--no-feature-cache"]) == 0
    full = json.loads((base / "out5" / "results.json").read_text())
    assert {r["backbone_features"] for r in full["rows"]} == {"encoded"}
    assert [r["recall"] for r in full["rows"]] == [r["recall"] for r in doc["rows"]]


def _heads_model(tmp: Path, name: str) -> Path:
    import yaml

    from vpr_ros.models.model_dir import create_model_dir

    data = yaml.safe_load((REPO / "config" / "models" / f"{name}.yaml").read_text())
    data["input"]["size"] = [112, 224]
    data["weights"] = {"backbone": "package"}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(data))
    create_model_dir(tmp / f"{name}.yaml", tmp / name)
    return tmp / name


def test_head_on_cached_features_equals_full_encoding(nordland_root: Path,
                                                      tmp_path: Path) -> None:
    """SelaVPR++ (packed hash codes) and CQVPR (local features) through the cache give the
    encoder's own arrays; a backbone with other weights gets another key and its own entry."""
    import numpy as np
    import torch

    from vpr_ros.eval.backbone_cache import HeldOutFeatures, backbone_key, key_digest
    from vpr_ros.eval.tasks import encode_eval, eval_image_sets, open_encoder
    from vpr_ros.eval.zoo import shared_backbones
    from vpr_ros.eval.zoo_runs import ZooModel

    db, q = eval_image_sets("nordland:summer", "nordland:winter", SUBSET)
    store = HeldOutFeatures(tmp_path / "cache", [db.paths, q.paths], batch_size=8,
                            progress=False)
    dirs = {n: _heads_model(tmp_path, n) for n in ("selavpr_effnetlite0", "cqvpr_effnetlite0")}
    keys = []
    for name, extra in (("selavpr_effnetlite0", "binary"), ("cqvpr_effnetlite0", "local")):
        enc = open_encoder(dirs[name], "torch", "cpu")
        key = backbone_key(enc, store.sets)
        keys.append(key)
        kw = dict(tolerance=1, subset=SUBSET, extras=(extra,), batch_size=8, progress=False,
                  encoder=enc)
        full = encode_eval(dirs[name], "nordland:summer", "nordland:winter", **kw)
        cached = encode_eval(dirs[name], "nordland:summer", "nordland:winter",
                             encode_fn=store.encode_fn(enc, key, (extra,)), **kw)
        for a, b in ((full.db_enc, cached.db_enc), (full.q_enc, cached.q_enc)):
            np.testing.assert_allclose(b.global_, a.global_, rtol=0, atol=1e-5)
            assert getattr(b, extra).dtype == getattr(a, extra).dtype
            if extra == "binary":
                np.testing.assert_array_equal(b.binary, a.binary)
            else:
                np.testing.assert_allclose(b.local, a.local, rtol=0, atol=1e-5)
    # both heads sit on the same pretrained backbone: one key, computed once, then on disk
    assert keys[0] == keys[1] and store.has(keys[0])
    assert [e["reused"] for e in store.entries.values()] == [False]
    # another backbone (one weight changed, as fine-tuning would): another key, not cached
    enc = open_encoder(dirs["cqvpr_effnetlite0"], "torch", "cpu")
    with torch.no_grad():
        next(enc.model.backbone.parameters()).view(-1)[0] += 1e-3
    other = backbone_key(enc, store.sets)
    assert key_digest(other) != key_digest(keys[0]) and not store.has(other)
    # another image list: another key too
    assert key_digest(backbone_key(enc, [db.paths])) != key_digest(other)
    # in a zoo, a backbone shared by two models is cached, a lone one is encoded in full
    zm = [ZooModel(n, d, "trained", None, 0, None, True) for n, d in dirs.items()]
    fresh = HeldOutFeatures(tmp_path / "other", store.sets)
    assert shared_backbones(zm, fresh, "cpu") == {key_digest(keys[0])}
    assert shared_backbones(zm[:1], fresh, "cpu") == frozenset()
    assert shared_backbones(zm[:1], store, "cpu") == {key_digest(keys[0])}  # on disk already
