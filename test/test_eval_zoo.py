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
        assert main(["eval", "recall", "--model", row["model_dir"], "--database",
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
