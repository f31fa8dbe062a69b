"""CPU backends: OpenVINO (fp32/bf16/fp16), PyTorch bf16 autocast, ONNX Runtime int8, the
host's CPU flags that gate them, and ``auto`` chosen by measurement.

Real runtimes on a real (random-weight, trained-like layer scales) DINOv2-S + QAA model and
real Nordland images; the reduced precisions run where this CPU has the instructions for them
and their refusal elsewhere is checked with fabricated hosts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.errors import BackendError, MapMismatchError
from vpr_ros.export.parity import row_cosines
from vpr_ros.runtime import auto_select
from vpr_ros.runtime.backend_select import Availability, cached_onnx, parse_backend
from vpr_ros.runtime.cpu_features import cpu_info, parse_cpuinfo
from vpr_ros.runtime.encoder import load_encoder

from backend_models import dino_qaa_model_dir, shared_dirs  # noqa: E402

AMX_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8
"""
AVX2_CPUINFO = """model name\t: AMD EPYC 7B12
flags\t\t: fpu sse avx avx2 fma f16c
"""
ARM_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes crc32 asimddp bf16 i8mm
CPU implementer\t: 0x41
"""
AVX2_HOST = parse_cpuinfo(AVX2_CPUINFO)
AMX_HOST = parse_cpuinfo(AMX_CPUINFO)
ALL_INSTALLED = Availability(ort_providers=("CPUExecutionProvider",),
                             openvino_cpu=("FP32", "BF16", "FP16", "INT8"))
HERE_BF16 = cpu_info().bf16
HERE_INT8 = cpu_info().int8
needs_bf16 = pytest.mark.skipif(not HERE_BF16, reason="this CPU has no AMX/AVX512-BF16")
needs_int8 = pytest.mark.skipif(not HERE_INT8, reason="this CPU has no VNNI/AMX int8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return dino_qaa_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_path(model_dir, tmp_path_factory) -> Path:
    return cached_onnx(model_dir, shared_dirs(tmp_path_factory)[1])


@pytest.fixture(scope="module")
def images(nordland_pairs):
    summer, winter = nordland_pairs
    return summer[:8] + winter[:8]


@pytest.fixture(scope="module")
def reference(model_dir, images) -> np.ndarray:
    return load_encoder(model_dir, backend="torch").encode(images)


@pytest.fixture()
def cache(tmp_path, monkeypatch, onnx_path) -> Path:
    """A private user cache (OpenVINO blobs, int8 files, auto decisions) for one test, holding
    the module's export already (as the runtime's on-demand export would have left it)."""
    root = tmp_path / "cache"
    (root / "exports").mkdir(parents=True)
    os.link(onnx_path, root / "exports" / onnx_path.name)
    monkeypatch.setenv("VPR_CACHE_DIR", str(root))
    return root


# -- the host ---------------------------------------------------------------------------------

def test_cpu_flags_say_which_reduced_precisions_the_hardware_has() -> None:
    assert AMX_HOST.bf16 and AMX_HOST.int8 and AMX_HOST.amx
    assert AMX_HOST.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert not AVX2_HOST.bf16 and not AVX2_HOST.int8 and "avx2" in AVX2_HOST.flags
    arm = parse_cpuinfo(ARM_CPUINFO)
    assert {"asimd", "bf16", "i8mm"} <= arm.flags and not arm.bf16  # x86 instructions only
    assert "amx_bf16" in AMX_HOST.describe() and "fpu" not in AMX_HOST.flags


def test_candidates_follow_the_hardware() -> None:
    def names(kind, cpu, avail=ALL_INSTALLED, export_cache=True):
        return [c.name for c in auto_select.cpu_candidates(kind, cpu, avail, export_cache)]

    assert names("model_dir", AMX_HOST) == [
        "torch:fp32", "onnxruntime:fp32", "openvino:fp32", "openvino:bf16", "torch:bf16",
        "onnxruntime:int8", "openvino:fp16"]
    # an AVX2-only CPU: fp32 everywhere, OpenVINO fp16 only if its plugin reports it
    avx2_ov = Availability(ort_providers=("CPUExecutionProvider",), openvino_cpu=("FP32",))
    assert names("model_dir", AVX2_HOST, avx2_ov) == [
        "torch:fp32", "onnxruntime:fp32", "openvino:fp32"]
    # an .onnx file has no PyTorch candidates; no export cache leaves PyTorch only
    assert names("onnx", AMX_HOST)[0] == "onnxruntime:fp32" and not any(
        n.startswith("torch") for n in names("onnx", AMX_HOST))
    assert names("model_dir", AMX_HOST, export_cache=False) == ["torch:fp32", "torch:bf16"]
    # openvino not installed
    no_ov = Availability(ort_providers=("CPUExecutionProvider",))
    assert not any(n.startswith("openvino") for n in names("model_dir", AMX_HOST, no_ov))


def test_backend_names() -> None:
    assert parse_backend("openvino:bf16") == ("openvino", "bf16")
    assert parse_backend("OpenVINO:f16") == ("openvino", "fp16")
    assert parse_backend("torch") == ("torch", None)
    assert parse_backend("onnxruntime:int8") == ("onnxruntime", "int8")
    with pytest.raises(BackendError, match=r"has no precision 'int8' \(it has fp32, bf16, fp16"):
        parse_backend("openvino:int8")
    with pytest.raises(BackendError, match="unknown backend 'tflite'.*openvino"):
        parse_backend("tflite")
    with pytest.raises(BackendError, match="precision it was built"):
        parse_backend("tensorrt:fp16")


# -- OpenVINO -----------------------------------------------------------------------------

def test_openvino_fp32_matches_pytorch_and_names_itself(model_dir, onnx_path, images,
                                                        reference, cache) -> None:
    enc = load_encoder(onnx_path, backend="openvino", expected_fingerprint=load_encoder(
        model_dir, backend="torch").fingerprint)
    assert enc.backend == "openvino-cpu-fp32" and enc.backend_choice == "openvino:fp32"
    assert row_cosines(reference, enc.encode(images)).min() >= 0.9999
    # from the model directory (through its on-demand export) too, with the same output
    direct = load_encoder(model_dir, backend="openvino:f32")
    np.testing.assert_allclose(direct.encode(images[:3]), enc.encode(images[:3]), atol=1e-6)


@needs_bf16
def test_openvino_bf16_and_fp16_stay_close_to_fp32(onnx_path, images, reference,
                                                   cache) -> None:
    for name, min_cos in (("openvino:bf16", 0.999), ("openvino:fp16", 0.999)):
        enc = load_encoder(onnx_path, backend=name)
        assert enc.backend == f"openvino-cpu-{name.split(':')[1]}"
        cos = row_cosines(reference, enc.encode(images))
        assert cos.min() >= min_cos, name
    assert cos.min() < 0.9999999  # reduced precision really ran (not fp32 under another name)


@needs_bf16
def test_openvino_cache_makes_the_second_start_reuse_the_compiled_model(onnx_path, images,
                                                                        cache) -> None:
    first = load_encoder(onnx_path, backend="openvino:bf16")
    blobs = sorted(p for p in (cache / "openvino").rglob("*") if p.is_file())
    assert blobs, "the first start writes OpenVINO's compiled model into the user cache"
    stamps = {p: p.stat().st_mtime_ns for p in blobs}
    second = load_encoder(onnx_path, backend="openvino:bf16")
    assert sorted(p for p in (cache / "openvino").rglob("*") if p.is_file()) == blobs
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # read, not rewritten
    np.testing.assert_array_equal(first.encode(images[:2]), second.encode(images[:2]))
    # fp32 in the same cache root gets its own blob: OpenVINO's cache key ignores the
    # precision hint, and a shared folder once gave NaN descriptors
    fp32 = load_encoder(onnx_path, backend="openvino:fp32")
    assert np.isfinite(fp32.encode(images[:2])).all()
    assert len([p for p in (cache / "openvino").rglob("*") if p.is_file()]) == len(blobs) + 1


def test_openvino_bad_input_is_refused_clearly(model_dir, onnx_path, tmp_path, cache) -> None:
    with pytest.raises(BackendError, match="OpenVINO device 'NPU' does not exist on this "
                                           "machine .*sees CPU"):
        load_encoder(onnx_path, backend="openvino", device="NPU")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(BackendError, match="OpenVINO model cache folder .* is not writable"):
        load_encoder(onnx_path, backend="openvino", cache_dir=blocker / "sub")
    with pytest.raises(MapMismatchError, match="was expected"):
        load_encoder(onnx_path, backend="openvino", expected_fingerprint="f" * 24)
    with pytest.raises(MapMismatchError, match="was expected"):  # refused before exporting
        load_encoder(model_dir, backend="openvino", expected_fingerprint="f" * 24)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(BackendError, match="not a readable ONNX file"):
        load_encoder(tmp_path / "junk.onnx", backend="openvino")
    with pytest.raises(BackendError, match="cannot run a TensorRT engine"):
        (tmp_path / "x.engine").write_bytes(b"")
        load_encoder(tmp_path / "x.engine", backend="openvino")


# -- PyTorch bf16, ONNX Runtime int8 ------------------------------------------------------------

@needs_bf16
def test_torch_bf16_autocast_on_a_bf16_cpu(model_dir, images, reference) -> None:
    enc = load_encoder(model_dir, backend="torch:bf16")
    assert enc.backend == "torch-cpu-bf16" and enc.backend_choice == "torch:bf16"
    out = enc.encode(images)
    assert out.dtype == np.float32
    cos = row_cosines(reference, out)
    assert 0.999 <= cos.min() < 0.9999999


@needs_int8
def test_onnxruntime_int8_quantises_once_and_keeps_the_metadata(onnx_path, images, reference,
                                                                cache) -> None:
    enc = load_encoder(onnx_path, backend="onnxruntime:int8")
    assert enc.backend == "onnxruntime-cpu-int8" and enc.fingerprint == load_encoder(
        onnx_path, backend="onnxruntime").fingerprint
    files = list((cache / "exports" / "int8").glob("*.onnx"))
    assert len(files) == 1
    import onnx

    ops = {n.op_type for n in onnx.load(str(files[0])).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # quantised MatMuls
    mtime = files[0].stat().st_mtime_ns
    load_encoder(onnx_path, backend="onnxruntime:int8")
    assert files[0].stat().st_mtime_ns == mtime      # reused
    cos = row_cosines(reference, enc.encode(images))
    assert 0.95 < cos.min() < 0.99999  # close, and really int8


def test_reduced_precisions_are_refused_where_the_cpu_lacks_them(model_dir, onnx_path,
                                                                 monkeypatch) -> None:
    import vpr_ros.runtime.cpu_features as cf

    monkeypatch.setattr(cf, "cpu_info", lambda: AVX2_HOST)
    with pytest.raises(BackendError, match="no bf16 matrix instructions.*use precision fp32"):
        load_encoder(model_dir, backend="torch:bf16")
    with pytest.raises(BackendError, match="no int8 dot-product instructions"):
        load_encoder(onnx_path, backend="onnxruntime:int8")
    with pytest.raises(BackendError, match="fp16 inference needs a CUDA device"):
        load_encoder(model_dir, backend="torch:fp16")


# -- auto by measurement ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(model_dir, onnx_path, tmp_path_factory):
    """One full measurement of every candidate, in a user cache shared by the auto tests."""
    root = tmp_path_factory.mktemp("auto_cache")
    (root / "exports").mkdir()
    os.link(onnx_path, root / "exports" / onnx_path.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VPR_CACHE_DIR", str(root))
        yield root, auto_select.decide(model_dir, "model_dir", budget_s=600)


def test_auto_measures_keeps_fp32_matches_and_caches(model_dir, measured, monkeypatch) -> None:
    root, decision = measured
    monkeypatch.setenv("VPR_CACHE_DIR", str(root))
    rows = {r.name: r for r in decision.rows}
    assert rows["torch:fp32"].note == "fp32 reference" and rows["torch:fp32"].status == "ok"
    assert {"onnxruntime:fp32", "openvino:fp32"} <= set(rows)
    if HERE_BF16:
        assert {"openvino:bf16", "torch:bf16"} <= set(rows)
    for r in decision.rows:
        if r.status == "ok":
            assert r.min_cosine >= auto_select.MIN_COSINE and r.latency_ms > 0 and r.batch_ms > 0
        if r.status == "rejected":
            assert r.min_cosine < auto_select.MIN_COSINE
    ok = [r for r in decision.rows if r.status == "ok"]
    assert decision.picked == min(ok, key=lambda r: r.latency_ms).name
    assert "Nordland" in decision.images or "built-in" in decision.images
    # the decision is cached: the next start does not measure, and opens the pick
    assert len(list((root / "backend_choice").glob("*.json"))) == 1
    again = auto_select.decide(model_dir, "model_dir")
    assert again.from_cache and again.picked == decision.picked
    assert [r.name for r in again.ranking()][0] == decision.picked
    enc = load_encoder(model_dir, backend="auto")
    assert enc.backend_choice == decision.picked and "cached decision" in enc.backend_note
    table = auto_select.format_decision(again)
    assert f"{decision.picked} **picked**" in table and "min cosine to fp32" in table


def test_the_objective_decides_which_timing_counts(model_dir, cache) -> None:
    from vpr_ros.runtime.backend_select import Choice

    cands = [Choice("torch", "cpu", precision="fp32"),
             Choice("onnxruntime", "cpu", (("provider", "cpu"),), precision="fp32")]
    fp = auto_select.artifact_fingerprint(model_dir, "model_dir")
    for objective, field in (("throughput", "batch_ms"), ("latency", "latency_ms")):
        d = auto_select.measure(model_dir, "model_dir", cands, objective, {}, fp)
        assert d.picked == min(d.rows, key=lambda r: getattr(r, field)).name
    with pytest.raises(BackendError, match="objective 'fastest' is not one of"):
        auto_select.decide(model_dir, "model_dir", objective="fastest")


def test_auto_never_picks_what_lost_recall_or_a_backend_that_cannot_open(
        model_dir, measured, tmp_path, monkeypatch) -> None:
    from vpr_ros.runtime.backend_select import Choice

    root, decision = measured
    monkeypatch.setenv("VPR_CACHE_DIR", str(root))
    fingerprint = auto_select.artifact_fingerprint(model_dir, "model_dir")
    auto_select.record_accuracy(fingerprint, "onnxruntime:fp32", r1=9.0, fp32_r1=10.6)
    assert "onnxruntime:fp32" not in auto_select.accuracy_exclusions(fingerprint)  # reference
    reduced = [r for r in decision.rows if not r.name.endswith(":fp32")]
    if reduced:  # the fastest reduced precision, recorded as losing 0.6 points of R@1
        loser = min(reduced, key=lambda r: r.latency_ms or 1e9).name
        auto_select.record_accuracy(fingerprint, loser, r1=10.0, fp32_r1=10.6, queries=1430)
        backend, precision = loser.split(":")
        cands = [Choice("torch", "cpu", precision="fp32"),
                 Choice(backend, "cpu", (("provider", "cpu"),) if backend == "onnxruntime"
                        else (), precision=precision)]
        redo = auto_select.measure(model_dir, "model_dir", cands, "latency", {}, fingerprint)
        row = redo.row(loser)
        assert row.status == "excluded" and "-0.6 points" in row.note
        assert redo.picked == "torch:fp32"
    # the pick cannot open (an unwritable OpenVINO cache): auto falls back and says why
    picked = decision.picked
    blocker = tmp_path / "file"
    blocker.write_text("x")
    enc = load_encoder(model_dir, backend="auto", cache_dir=blocker / "ov")
    if picked.startswith("openvino"):
        assert enc.backend_choice != picked
        assert f"fell back past {picked}" in enc.backend_note and "not writable" in \
            enc.backend_note
    else:  # options another backend does not take are dropped in auto mode
        assert enc.backend_choice == picked


def test_auto_without_a_writable_cache_still_decides(model_dir, tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("VPR_CACHE_DIR", str(blocker / "cache"))
    decision = auto_select.decide(model_dir, "model_dir", budget_s=300, export_cache=False)
    assert decision.picked.startswith("torch:") and "not cached" in decision.cache_note
    assert "not cached" in decision.summary()


def test_probe_images_fall_back_to_a_builtin_set_and_say_so(monkeypatch) -> None:
    import vpr_ros.datasets.nordland as nordland

    monkeypatch.setattr(nordland, "shared_data_dir", lambda: None)
    imgs, source = auto_select.probe_images(6)
    assert len(imgs) == 6 and "built-in deterministic images" in source and "Nordland" in source
    again, _ = auto_select.probe_images(6)
    assert all(np.array_equal(a, b) for a, b in zip(imgs, again))
    assert len({a.tobytes() for a in imgs}) == 6 and all(a.std() > 20 for a in imgs)


def test_vpr_model_info_backends(model_dir, measured, monkeypatch, capsys) -> None:
    from vpr_ros.cli import main

    monkeypatch.setenv("VPR_CACHE_DIR", str(measured[0]))
    assert main(["model", "info", str(model_dir), "--backends"]) == 0
    out = capsys.readouterr().out
    assert "**picked**" in out and "torch:fp32" in out and "probe images:" in out
    assert main(["model", "info", str(model_dir), "--backends", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["from_cache"] and doc["picked"] in {r["name"] for r in doc["rows"]}
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "info", str(model_dir), "--backends", "--objective", "nope"])
    assert exit_info.value.code == 2
