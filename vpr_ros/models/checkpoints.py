"""Reading weight files safely and mapping official checkpoint layouts onto our modules.

Nothing here unpickles user files: ``.safetensors`` go through safetensors and ``.pth`` through
``torch.load(weights_only=True)``. Every mapping is explicit, and a key that is missing,
unexpected or of the wrong shape is an error that names it (a checkpoint that "mostly loads" is
how silently broken models ship).

Official layouts handled:

* facebookresearch/dinov2 ``*_pretrain.pth`` (``cls_token``, ``pos_embed``, ``register_tokens``,
  ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.*`` or FSDP-chunked ``blocks.C.N.*``,
  ``norm.*``; ViT-g's fused SwiGLU ``mlp.w12``/``mlp.w3``).
* the QAA release (``config.json`` + ``model.safetensors``): ``backbone.model.<dinov2 keys>``
  and ``aggregator.<keys of the released qaa.py>``.

Keys the released forward passes never read are accepted and dropped, and listed in
``IGNORED_OFFICIAL_KEYS``: DINOv2's ``mask_token`` (masked-image pre-training only) and QAA's
``dust_bin`` (a leftover of the optimal-transport variant; QAA's similarity has no dustbin).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vpr_ros.errors import CheckpointError

IGNORED_OFFICIAL_KEYS = ("mask_token", "dust_bin")


def safe_torch_load(path: str | Path, what: str = "weight", mmap: bool = False,
                    advice: str = "") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors: a pickle that names anything
    but tensors and plain containers is refused (never run), and says so instead of passing on
    torch's advice to retry with ``weights_only=False``."""
    p = Path(path)
    # mmap needs torch's zip format; an old-style pickle is read whole (and refused below).
    mmap = mmap and zipfile.is_zipfile(p)
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand \d+|Unsupported class [\w.]+",
                          str(exc))
        detail = f" ({found.group(0)})" if found else ""
        advice = advice or ("use weights saved as .safetensors, or a .pth holding only tensors "
                            "(torch.save(model.state_dict(), ...))")
        raise CheckpointError(
            f"{p}: holds pickled Python objects besides tensors{detail}; such files are never "
            f"loaded, because unpickling can run any code: {advice}") from None
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(f"{p}: cannot read this {what} file ({type(exc).__name__}: "
                              f"{one_line(exc)}); the file is truncated, corrupt or not a "
                              f"{what} file") from None


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened (library messages run to pages)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:limit] + ("..." if len(text) > limit else "")


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the tensors holding NaN or Inf: such weights make every image's
    descriptor NaN, or all alike (a GeM exponent of +Inf), and must never reach a map."""
    bad = [k for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: tensor(s) {_abbrev(bad)} hold NaN or Inf; the weights "
                              "are corrupt (or training diverged): use another checkpoint")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or ``.pth``/``.pt`` without unpickling code; every
    floating-point tensor must be finite."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weight file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = dict(load_file(str(p), device="cpu"))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{p}: cannot read weights ({type(exc).__name__}: "
                                  f"{one_line(exc)}); the file is truncated, corrupt or not a "
                                  "weight file: download or export it again") from None
    else:
        obj = safe_torch_load(p)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a mapping of parameter names to tensors")
    check_finite(obj, str(p))
    return dict(obj)


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``; every key and shape must match, else a named error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_abbrev(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_abbrev(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: does not fit this model: " + "; ".join(problems)
                              + ". Check that the config (architecture, variant, dims) matches "
                              "the checkpoint.")
    module.load_state_dict(state, strict=True)


def _abbrev(items: list[str], n: int = 8) -> str:
    return str(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# -- DINOv2 ----------------------------------------------------------------------------------

def dinov2_to_ours(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 names (after ``prefix``) -> :class:`DinoV2Backbone` names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k in IGNORED_OFFICIAL_KEYS:
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # FSDP chunks -> flat
        k = k.replace("patch_embed.proj.", "patch_embed.")
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = value
    return out


def infer_dinov2_arch(sd: Mapping[str, torch.Tensor]) -> dict[str, int | str]:
    """Architecture of an official DINOv2 state dict from its tensor shapes."""
    from vpr_ros.models.backbones.dinov2 import ARCHS

    if "cls_token" not in sd or "pos_embed" not in sd:
        raise CheckpointError("not a DINOv2 checkpoint: no cls_token/pos_embed")
    dim = int(sd["cls_token"].shape[-1])
    arch = next((a for a, s in ARCHS.items() if s["dim"] == dim), None)
    if arch is None:
        raise CheckpointError(f"no DINOv2 architecture has width {dim}")
    registers = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    return {"arch": arch, "registers": registers}


def dinov2_state(sd: Mapping[str, torch.Tensor], arch: str, registers: int,
                 source: str | Path) -> dict[str, torch.Tensor]:
    """An official DINOv2 state dict in this project's names; CheckpointError unless it is
    the ``arch`` with ``registers`` the config asks for (every DINOv2-based backbone loads its
    trunk through here, so all refuse a wrong file with the same message)."""
    found = infer_dinov2_arch(sd)
    if found["arch"] != arch or found["registers"] != registers:
        raise CheckpointError(f"{source}: is DINOv2 {found['arch']} with {found['registers']} "
                              f"registers, but the config asks for {arch} with {registers}; "
                              "fix backbone.params in the config")
    return dinov2_to_ours(sd)


def load_dinov2_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load an official DINOv2 ``.pth`` (or a safetensors copy) into a DinoV2Backbone."""
    state = dinov2_state(read_state_dict(path), backbone.arch, backbone.num_registers, path)
    load_exact(backbone, state, str(path))
    backbone.release_fixed_size()
