"""`vpr bench encoder --accuracy`: does a reduced precision change what the map answers?

A descriptor cosine of 0.999 says two backends agree image by image; retrieval can still move
where many places look alike. So each backend x precision encodes the model-zoo comparison's
held-out Nordland split (the last 40 % of the route, winter queries against the summer
database, +-1 file; the zoo table's protocol) and searches it exactly as ``vpr eval recall``
does; its Recall@1 is reported next to PyTorch fp32's. The figures are recorded for ``backend:
auto`` (:func:`~vpr_ros.runtime.auto_select.record_accuracy`): a reduced precision that loses
more than 0.5 point of R@1 on a model is never chosen for it.

Default model: the zoo's pretrained baseline (ImageNet EfficientNet-Lite0 + GeM p=3 at the
recipes' test size, 112x224), whose weights ship with the package, so the figure means
something without a training run; trained model directories (``vpr eval zoo`` runs) can be
given instead. A config with random weights is accepted too, with the warning that its R@1 is
near chance and shows only whether the ranking moves.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vpr_ros.errors import ConfigError

#: The model-zoo table's held-out protocol.
SPLIT = {"database": "nordland:summer", "queries": "nordland:winter", "subset": "0.6:1.0",
         "tolerance": 1}
ZOO_BASELINE = "zoo-gem"
ZOO_TEST_SIZE = (112, 224)
ACCURACY_BACKENDS_SKIPPED = ("onnxruntime-cpu-untuned", "onnxruntime-cpu-spin")


def accuracy_model(spec: str, workdir: Path) -> tuple[Path, str]:
    """(model directory, note) for ``spec``: ``zoo-gem``, a model directory, or a model config
    (random weights where the config has no weights)."""
    p = Path(spec)
    if spec == ZOO_BASELINE:
        from vpr_ros.eval.zoo_runs import pretrained_gem
        from vpr_ros.resources import config_file

        m = pretrained_gem(config_file("models", "gem_effnetlite0.yaml"), ZOO_TEST_SIZE,
                           workdir / "accuracy_models")
        return m.model_dir, "pretrained ImageNet EfficientNet-Lite0 + GeM (the zoo baseline)"
    if (p / "model.json").is_file():
        return p, "model directory"
    from vpr_ros.bench.encoder_bench import ensure_model_dir, resolve_config
    from vpr_ros.models.config import load_yaml

    weights = dict(load_yaml(resolve_config(spec)).get("weights") or {})
    random = weights.get("backbone") in (None, "none", "random")
    return (ensure_model_dir(spec, workdir / "models"),
            "random weights: R@1 near chance, shows only whether the ranking moves" if random
            else "config weights, untrained head")


def run_accuracy(models: Sequence[str], backends: Sequence[str], workdir: Path,
                 batch_size: int = 16, subset: str = SPLIT["subset"], record: bool = True,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """R@1/R@5 per model x backend on the held-out split; ``record`` stores them for auto."""
    from vpr_ros.bench.encoder_bench import BACKENDS
    from vpr_ros.eval.search_plan import plan_search
    from vpr_ros.eval.tasks import encode_eval, recall_from_encoded
    from vpr_ros.models.model_dir import read_model_meta
    from vpr_ros.runtime.auto_select import MAX_R1_LOSS_POINTS, record_accuracy
    from vpr_ros.runtime.encoder import load_encoder

    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; choose from {sorted(BACKENDS)}")
    if "torch-cpu" not in backends:
        backends = ["torch-cpu", *backends]  # the fp32 reference is always measured
    out_rows = []
    t0 = time.time()
    for spec in models:
        model_dir, note = accuracy_model(spec, workdir)
        label = Path(spec).stem if spec.endswith((".yaml", ".yml")) else Path(spec).name
        fingerprint = read_model_meta(model_dir).fingerprint
        rows = []
        for name in backends:
            if name in ACCURACY_BACKENDS_SKIPPED:
                continue
            opts = {k: v for k, v in BACKENDS[name].items() if k != "artifact"}
            if progress:
                progress(f"accuracy: {label} with {name}")
            try:
                enc = load_encoder(model_dir, **opts)
                ev = encode_eval(model_dir, SPLIT["database"], SPLIT["queries"],
                                 tolerance=SPLIT["tolerance"], subset=subset, encoder=enc,
                                 batch_size=batch_size, progress=False)
                res = recall_from_encoded(ev, plan_search(enc.output_names, "flat"),
                                          ks=(1, 5, 10))
            except Exception as exc:  # a backend that cannot run here is a row, not a crash
                rows.append({"backend": name, "model": label, "error":
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                continue
            r = res["recall"]
            rows.append({"backend": enc.backend, "choice": enc.backend_choice,
                         "model": label, "model_dir": str(model_dir),
                         "fingerprint": fingerprint, "note": note,
                         "queries": res["num_queries"], "r1": round(100 * r["R@1"], 2),
                         "r5": round(100 * r["R@5"], 2), "r10": round(100 * r["R@10"], 2),
                         "encode_s": ev.timings["encode"]})
        ref = next((r for r in rows if r.get("choice") == "torch:fp32"), None)
        for r in rows:
            if "error" in r or ref is None:
                continue
            r["fp32_r1"] = ref["r1"]
            r["delta_points"] = round(r["r1"] - ref["r1"], 2)
            reduced = not r["choice"].endswith(":fp32")
            r["auto_may_choose"] = (not reduced) or r["delta_points"] >= -MAX_R1_LOSS_POINTS
            if record and reduced:
                record_accuracy(fingerprint, r["choice"], r["r1"], ref["r1"],
                                r5=r["r5"], queries=r["queries"], split=SPLIT | {
                                    "subset": subset}, measured=time.strftime("%Y-%m-%d"))
        out_rows += rows
    return {"rows": out_rows, "split": SPLIT | {"subset": subset},
            "max_r1_loss_points": MAX_R1_LOSS_POINTS, "wall_s": round(time.time() - t0, 1)}


def format_accuracy(result: dict[str, Any]) -> str:
    split = result["split"]
    lines = ["| backend | model | R@1 | fp32 R@1 | change (points) | R@5 | auto may choose it |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['model']} | error: {r['error'][:100]} |")
            continue
        lines.append(f"| {r['backend']} | {r['model']} | {r['r1']:.2f} | "
                     f"{r.get('fp32_r1', float('nan')):.2f} | "
                     f"{r.get('delta_points', float('nan')):+.2f} | {r['r5']:.2f} | "
                     f"{'yes' if r.get('auto_may_choose') else 'no'} |")
    n = next((r["queries"] for r in result["rows"] if "queries" in r), "?")
    lines.append(f"\nsplit: {split['queries']} queries against {split['database']}, subset "
                 f"{split['subset']}, +-{split['tolerance']} file, {n} queries; a reduced "
                 f"precision losing more than {result['max_r1_loss_points']} point of R@1 is "
                 "never chosen by backend auto (recorded for it)")
    notes = sorted({f"{r['model']}: {r['note']}" for r in result["rows"] if r.get("note")})
    lines += [f"model {n}" for n in notes]
    return "\n".join(lines)
