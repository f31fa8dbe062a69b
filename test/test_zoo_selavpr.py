"""SelaVPR++: MultiConv adapters, the frozen-trunk side network, the float + hash heads, the
binary-code contract with PlaceMap (Hamming first stage, float re-rank) and ONNX export."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_ros.errors import CheckpointError, ConfigError
from vpr_ros.mapdb.keyframe import Keyframe
from vpr_ros.mapdb.place_map import PlaceMap
from vpr_ros.models import build_model, model_config_from_dict
from vpr_ros.models.aggregators.selavpr import SelaVPRAggregator, pack_sign_bits, sign_ste
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.backbones.dinov2_side_adapter import (DinoV2SideAdapterBackbone,
                                                          MultiConvAdapter)
from vpr_ros.models.config import load_yaml
from vpr_ros.models.registry import build_component

CONFIGS = Path(__file__).resolve().parents[1] / "config" / "models"
SIZE = (56, 70)  # 4 x 5 patches: small enough for CPU tests, not square (catches h/w mix-ups)


def n_params(m: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


def adapter_params(c: int) -> int:
    """Closed form of one MultiConv adapter of width C (the released layout)."""
    d, red = c // 2, c // 32
    fc = (c * d + d) + (d * c + c)
    b1 = d * (c // 4) + c // 4 + 2 * (c // 4)
    b23 = 2 * ((d * red + red + 2 * red)
               + (red * (c // 8) * 9 + c // 8 + 2 * (c // 8)))
    b23 += red * (c // 8) * (25 - 9)  # the 5x5 branch's extra taps
    return fc + b1 + b23


def randomize_side(bb: DinoV2SideAdapterBackbone, seed: int = 0) -> None:
    """Released init is zero up-projection (side net = identity); give it real weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.startswith("adapters"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, buf in bb.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)


def tiny_side_model(branches: int = 2, hash_bits: int = 512, depth: int = 2, adapted: int = 1):
    """ViT-S/14 side model cut to ``depth`` blocks (CPU budget), ``adapted`` of them adapted, so
    the side network starts after block ``depth - adapted - 1`` like the ViT-L release."""
    cfg = model_config_from_dict({
        "backbone": {"name": "dinov2_side_adapter",
                     "params": {"arch": "vits14", "adapted_blocks": adapted,
                                "branches": branches}},
        "aggregator": {"name": "selavpr", "params": {"out_dim": 256, "hash_bits": hash_bits,
                                                     "branches": branches}},
        "input": {"size": list(SIZE)}})
    torch.manual_seed(0)
    model = build_model(cfg)
    del model.backbone.blocks[depth:]
    randomize_side(model.backbone)
    return model.eval()


@pytest.fixture(scope="module")
def shared_model():
    """Two-branch model: 3 trunk blocks, the last 2 adapted (built once: ViTs are slow on CPU)."""
    return tiny_side_model(branches=2, hash_bits=512, depth=3, adapted=2)


@pytest.fixture()
def model(shared_model):
    return copy.deepcopy(shared_model)


# -- architecture and parameter counts ---------------------------------------------------------

@pytest.mark.parametrize("c,expected", [(768, 762_768), (1024, 1_354_944)])
def test_adapter_parameter_count_matches_the_release(c: int, expected: int) -> None:
    # 762,768 (ViT-B: 384/192/24/96/24/96) and 1,354,944 (ViT-L: 512/256/32/128/32/128) are the
    # counts of the released MulConvAdapter configurations.
    adapter = MultiConvAdapter(c)
    assert n_params(adapter) == expected == adapter_params(c)
    hidden = adapter.branch1.conv.out_channels + adapter.branch2[1].conv.out_channels \
        + adapter.branch3[1].conv.out_channels
    assert hidden == adapter.D_fc1.out_features == c // 2


@pytest.mark.parametrize("config,per_branch,head,dim", [
    ("selavpr_dinov2b.yaml", 12 * 762_768, 2_165_505 + 984_321, 2048),
    ("selavpr_dinov2l.yaml", 16 * 1_354_944, 5_248_001 + 1_574_401, 4096)])
def test_paper_configs_trainable_parameters_and_dims(config: str, per_branch: int, head: int,
                                                     dim: int) -> None:
    cfg = model_config_from_dict(load_yaml(CONFIGS / config), source=config)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.descriptor_dim == dim
    assert model.extra_outputs == ("binary",)
    assert model.aggregator.hash_bits == 512
    bb = model.backbone
    assert n_params(bb, trainable=True) == 2 * per_branch  # only the two side networks train
    assert n_params(bb) - n_params(bb, trainable=True) == sum(
        p.numel() for n, p in bb.named_parameters() if not n.startswith("adapters"))
    # float head: C x C token projection + GeM p + C -> dim; hash head: C x C + p + C -> 512
    assert n_params(model.aggregator) == head


def test_side_network_follows_the_paper_data_flow(model) -> None:
    """Independent loop: y starts at the tokens entering the first adapted block and adds
    adapter_i(y + x_i) after every adapted block; features = final norm of y."""
    bb = model.backbone
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        out = bb(x)
        tokens, grid = bb.prepare_tokens(x)
        t1 = bb.blocks[0](tokens)
        t2 = bb.blocks[1](t1)
        t3 = bb.blocks[2](t2)
        expected = []
        for adapters in (bb.adapters, bb.adapters_hashing):
            y = t1 + adapters[0](t1 + t2, grid)
            y = y + adapters[1](y + t3, grid)
            y = bb.norm(y)
            expected.append(y[:, 1:].transpose(1, 2).reshape(2, 384, *grid))
    assert out.features.shape == (2, 768, 4, 5)
    torch.testing.assert_close(out.features, torch.cat(expected, 1))
    assert not torch.allclose(expected[0], expected[1])  # the branches really differ


def test_adapter_convolves_the_patch_grid_and_lets_the_class_token_bypass() -> None:
    torch.manual_seed(1)
    adapter = MultiConvAdapter(64).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.2)
    tokens = torch.randn(1, 1 + 3 * 4, 64)
    with torch.no_grad():
        out = adapter(tokens, (3, 4))
        x0 = F.relu(adapter.D_fc1(tokens))
        # class token: its down-projection plus the residual, up-projected; no convolution
        torch.testing.assert_close(out[:, 0], adapter.D_fc2(2 * x0[:, 0]))
        # patches: conv branches on the (h, w) grid in row-major token order, plus residual
        grid = x0[:, 1:].reshape(1, 3, 4, 32).permute(0, 3, 1, 2)
        branches = [adapter.branch1(grid), adapter.branch2(grid), adapter.branch3(grid)]
        conv = torch.cat(branches, 1).permute(0, 2, 3, 1).reshape(1, 12, 32)
        torch.testing.assert_close(out[:, 1:], adapter.D_fc2(conv + x0[:, 1:]))
        # moving one patch changes its 5x5 neighbourhood only through the convolutions
        moved = tokens.clone()
        moved[:, 1] += 1.0
        delta = (adapter(moved, (3, 4)) - out).abs().sum(-1)[0]
    assert delta[0] == 0 and delta[1] > 0 and delta[2:].max() > 0


def test_released_initialisation_starts_as_the_frozen_features(model) -> None:
    bb = model.backbone
    for adapter in [*bb.adapters, *bb.adapters_hashing]:
        adapter.reset_parameters()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        tokens, _ = bb.prepare_tokens(x)
        entering = bb.blocks[0](tokens)  # the side network starts after block 0 here
        expected = bb.norm(entering)[:, 1:].transpose(1, 2).reshape(1, 384, 4, 5)
        torch.testing.assert_close(bb(x).features, torch.cat([expected, expected], 1))


def test_no_gradient_reaches_the_frozen_trunk(model) -> None:
    model.train()
    bb = model.backbone
    trunk = [p for n, p in bb.named_parameters() if not n.startswith("adapters")]
    assert not any(p.requires_grad for p in trunk)
    for p in trunk:  # even if someone unfreezes it, the trunk runs without autograd
        p.requires_grad_(True)
    out = model.forward_all(torch.randn(4, 3, *SIZE))
    (out["global"].sum() + out["hash_codes"].sum()).backward()
    assert all(p.grad is None for n, p in bb.named_parameters()
               if n.startswith(("blocks", "patch_embed", "pos_embed", "cls_token")))
    assert all(p.grad is not None for n, p in bb.named_parameters() if n.startswith("adapters"))
    assert bb.norm.weight.grad is not None  # the final norm sits on the side path
    assert model.aggregator.linear4.weight.grad is not None


def test_hash_branch_initialises_from_the_float_branch(model) -> None:
    bb = model.backbone
    bb.init_hash_branch_from_float()
    with torch.no_grad():
        f = bb(torch.randn(1, 3, *SIZE)).features
    torch.testing.assert_close(f[:, :384], f[:, 384:])


@pytest.mark.parametrize("kind,name,params,match", [
    ("backbone", "dinov2_side_adapter", {"arch": "vits14", "branches": 3}, "branches"),
    ("backbone", "dinov2_side_adapter", {"arch": "vits14", "adapted_blocks": 13},
     "adapted_blocks"),
    ("backbone", "dinov2_side_adapter", {"arch": "vitx14"}, "arch"),
    ("aggregator", "selavpr", {"hash_bits": 100}, "multiple of 8"),
    ("aggregator", "selavpr", {"branches": 2, "hash_bits": 0}, "hash_bits=0"),
    ("aggregator", "selavpr", {"branches": 2, "in_channels": 385}, "odd")])
def test_bad_parameters_are_config_errors(kind: str, name: str, params: dict, match: str) -> None:
    injected = {} if kind == "backbone" else {"in_channels": params.pop("in_channels", 384)}
    with pytest.raises(ConfigError, match=match):
        build_component(kind, name, params, **injected)


def test_official_dinov2_weights_load_into_the_trunk_only(tmp_path: Path) -> None:
    bb = DinoV2SideAdapterBackbone("vits14", adapted_blocks=2, branches=1)
    randomize_side(bb)
    side_before = {k: v.clone() for k, v in bb.state_dict().items() if k.startswith("adapters")}
    official = {k.replace("patch_embed.", "patch_embed.proj."): torch.randn_like(v)
                for k, v in bb.state_dict().items() if not k.startswith("adapters")}
    official["mask_token"] = torch.zeros(1, 384)  # pre-training only; dropped on load
    torch.save(official, tmp_path / "dinov2_vits14_pretrain.pth")
    bb.load_pretrained(str(tmp_path / "dinov2_vits14_pretrain.pth"))
    state = bb.state_dict()
    for k, v in official.items():
        if k != "mask_token":
            torch.testing.assert_close(state[k.replace("patch_embed.proj.", "patch_embed.")], v)
    for k, v in side_before.items():
        torch.testing.assert_close(state[k], v)
    torch.save({"cls_token": torch.zeros(1, 1, 768), "pos_embed": torch.zeros(1, 1370, 768)},
               tmp_path / "vitb.pth")
    with pytest.raises(CheckpointError, match="vitb14"):
        bb.load_pretrained(str(tmp_path / "vitb.pth"))


# -- heads and codes ---------------------------------------------------------------------------

def test_codes_are_packed_signs_in_numpy_bit_order_with_straight_through_gradient() -> None:
    z = torch.randn(5, 64, requires_grad=True)
    packed = pack_sign_bits(z.detach())
    assert packed.dtype == torch.uint8 and packed.shape == (5, 8)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(z.detach().numpy() >= 0, axis=1))
    codes = sign_ste(z)
    assert set(codes.detach().unique().tolist()) == {-1.0, 1.0}
    (codes * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(64.0).expand(5, 64))


def test_heads_follow_the_release_formula() -> None:
    torch.manual_seed(2)
    agg = SelaVPRAggregator(in_channels=2 * 48, out_dim=32, hash_bits=16, branches=2).eval()
    feats = torch.randn(3, 96, 4, 5)
    with torch.no_grad():
        out = agg.forward_all(BackboneOutput(feats))

        def head(f, fc_in, p, fc_out):
            t = F.normalize(fc_in(f.flatten(2).transpose(1, 2)), dim=-1).clamp(min=1e-6)
            return F.normalize(fc_out(t.pow(p).mean(1).pow(1 / p)), dim=-1)

        g = head(feats[:, :48], agg.linear1, agg.gem.p, agg.linear2)
        z = head(feats[:, 48:], agg.linear3, agg.gem_hashing.p, agg.linear4)
    torch.testing.assert_close(out["global"], g)
    np.testing.assert_array_equal(out["binary"].numpy(), np.packbits(z.numpy() >= 0, axis=1))
    assert set(out) == {"global", "binary"}
    agg.train()
    train_out = agg.forward_all(BackboneOutput(feats))
    torch.testing.assert_close(train_out["hash_float"], z)
    torch.testing.assert_close(train_out["hash_codes"], torch.where(z >= 0, 1.0, -1.0))


# -- the two-stage search through PlaceMap ------------------------------------------------------

def keyframes(n: int, start: int = 0) -> list[Keyframe]:
    return [Keyframe(session="s", stamp_ns=(start + i) * 10**8, frame_id="cam")
            for i in range(n)]


def test_binary_first_stage_then_float_rerank_through_placemap(model) -> None:
    torch.manual_seed(3)
    db_images = torch.randn(48, 3, *SIZE)
    q_images = db_images[::4] + 0.3 * torch.randn(12, 3, *SIZE)
    with torch.no_grad():
        db, q = model.forward_all(db_images), model.forward_all(q_images)
    db_f, db_b = db["global"].numpy(), db["binary"].numpy()
    q_f, q_b = q["global"].numpy(), q["binary"].numpy()
    assert db_b.dtype == np.uint8 and db_b.shape == (48, 64)

    # Hamming distances computed independently of faiss. Per query, a candidate count with no
    # tie at its boundary makes the candidate set unambiguous; one map per such count.
    ham = np.unpackbits(q_b[:, None] ^ db_b[None], axis=2).sum(-1)
    maps: dict[int, PlaceMap] = {}
    k = 5
    differs_from_full_search = False
    for r in range(len(q_f)):
        srt = np.sort(ham[r])
        rerank = next(n for n in range(8, 40) if srt[n - 1] < srt[n])
        if rerank not in maps:
            maps[rerank] = PlaceMap.create(db_f.shape[1], "fp-test", {
                "kind": "binary", "bits": 512, "codes": "model", "rerank": rerank})
            maps[rerank].add(db_f, keyframes(48), binary_codes=db_b)
        ids, scores = maps[rerank].search(q_f[r], k, query_codes=q_b[r])
        cand = np.argsort(ham[r], kind="stable")[:rerank]
        exact = q_f[r] @ db_f[cand].T
        order = cand[np.lexsort((cand, -exact))][:k]
        np.testing.assert_array_equal(ids[0], order)
        np.testing.assert_allclose(scores[0], q_f[r] @ db_f[order].T, rtol=1e-5, atol=1e-6)
        full = np.argsort(-(q_f[r] @ db_f.T), kind="stable")[:k]
        differs_from_full_search |= not np.array_equal(full, order)
        # Unpacked {0,1} bits describe the same codes.
        ids2, _ = maps[rerank].search(q_f[r], k, query_codes=np.unpackbits(q_b[r]))
        np.testing.assert_array_equal(ids2, ids)
    # The first stage really restricts the search: the code branch is not the float branch.
    assert differs_from_full_search


# -- export ------------------------------------------------------------------------------------

def export_onnx(model, path: Path) -> tuple[str, ...]:
    """Export through ``vpr_ros.export`` (TensorRT op set, no image-independent compute, ONNX
    Runtime parity: its own checks) when that package is present; otherwise plain
    ``torch.onnx.export`` with the same conventions. Returns the output names."""
    names = ("global", *model.extra_outputs)
    try:
        from vpr_ros.export.onnx_export import export_model_onnx
    except ImportError:
        export_model_onnx = None
    if export_model_onnx is not None:
        meta = export_model_onnx(model, path, model_fingerprint="0" * 24, verify=True)
        assert tuple(meta.outputs) == names
        return names

    class Outputs(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, images: torch.Tensor):
            out = self.m.forward_all(images)
            return tuple(out[n] for n in names)

    model.eval().fix_input_size()
    h, w = model.input_size
    with torch.no_grad():
        Outputs(model)(torch.randn(1, 3, h, w))  # warm the aggregator's query cache
        torch.onnx.export(Outputs(model).eval(), (torch.randn(2, 3, h, w),), str(path),
                          input_names=["images"], output_names=list(names), dynamo=False,
                          opset_version=17, dynamic_axes={"images": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
    return names


def test_onnx_export_gives_the_same_descriptors_and_codes(model, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "selavpr.onnx"
    assert export_onnx(model, path) == ("global", "binary")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, *SIZE)
    g, b = sess.run(["global", "binary"], {"images": x3.numpy()})
    with torch.no_grad():
        ref = model.forward_all(x3)
    cos = (g * ref["global"].numpy()).sum(1) / np.linalg.norm(g, axis=1)
    assert cos.min() >= 0.9999
    assert b.dtype == np.uint8 and b.shape == (3, 64)
    flipped = np.unpackbits(b ^ ref["binary"].numpy(), axis=1).mean()
    assert flipped <= 1e-3, f"{flipped:.2%} of the bits differ"
    assert math.isclose(float(np.linalg.norm(g, axis=1).mean()), 1.0, rel_tol=1e-4)
