"""ONNX Runtime int8: dynamic quantisation of an exported graph's weight MatMuls.

Why dynamic and MatMul only: a ViT spends most of its time in the projection and MLP matrix
products, whose weights are constants; quantising those to int8 (activations quantised on the
fly per tensor) runs them on the CPU's VNNI/AMX int8 units with no calibration data. The
attention's own products (activation x activation) and everything else stay fp32
(``MatMulConstBOnly``). Whether retrieval survives is not assumed: ``auto`` keeps the variant
only when its descriptors stay at cosine >= 0.999 to fp32 on real images, and ``vpr bench
encoder --accuracy`` reports its Nordland R@1 next to fp32's.

The quantised file is made once per model and ONNX Runtime version, in the user cache
(``exports/int8``), and carries the source's metadata (fingerprint, preprocessing), so it is
checked exactly like the file it came from.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from vpr_ros.errors import BackendError
from vpr_ros.export.artifact import read_onnx_metadata

log = logging.getLogger(__name__)

#: Bumped when the quantisation recipe changes (part of the cached file's name).
RECIPE = "dyn-matmul-constb-qint8-v1"


def int8_cache_dir() -> Path:
    from vpr_ros.runtime.user_cache import cache_root

    return cache_root() / "exports" / "int8"


def int8_onnx(onnx_path: str | Path, cache_dir: Optional[Path] = None) -> Path:
    """The int8 twin of ``onnx_path`` (made once, then reused)."""
    import onnx
    import onnxruntime as ort

    src = Path(onnx_path)
    meta = read_onnx_metadata(src)
    if Path(str(src) + ".data").exists():
        raise BackendError(f"{src}: weights stored outside the file (a model above 2 GB) are "
                           "not quantised to int8 here; use onnxruntime fp32 or openvino")
    from vpr_ros.runtime.user_cache import writable_dir

    folder = writable_dir(Path(cache_dir or int8_cache_dir()), "int8 model cache folder")
    out = folder / f"{meta.fingerprint}.{RECIPE}.ort{ort.__version__}.onnx"
    if out.is_file():
        return out
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantising %s to int8 for onnxruntime (once; later runs reuse %s)", src, out)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp.onnx")
    os.close(fd)
    try:
        quantize_dynamic(str(src), tmp, op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8, per_channel=False,
                         extra_options={"MatMulConstBOnly": True})
        model = onnx.load(tmp)
        props = {e.key: e.value for e in onnx.load(str(src), load_external_data=False)
                 .metadata_props}
        del model.metadata_props[:]
        for k, v in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(model, tmp)
        os.replace(tmp, out)
    except BackendError:
        raise
    except Exception as exc:  # the quantiser raises assorted onnx/numpy errors
        raise BackendError(f"{src}: int8 quantisation failed ({type(exc).__name__}: {exc}); use "
                           "onnxruntime fp32") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
