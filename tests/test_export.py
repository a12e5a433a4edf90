"""`dsv3c export-onnx`: every dense block of the tiny configs through torch.onnx (dynamo) and onnxruntime (CPU)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dsv3.checkpoint import checkpoint_inventory  # noqa: E402
from dsv3.config import resolve_config  # noqa: E402
from dsv3.export import onnx_export as ox  # noqa: E402
from dsv3.export.blocks import ExportBlock, ExportError  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

LAYER = {"attention": 0, "dense-mlp": 0, "dense-layer": 0, "shared-expert": 1, "router": 1}


def _export(tmp_path, block, *, ckpt=None, config=None, opset=20, dtype="fp32", verify=True, layer=None):
    out = tmp_path / f"{block}-{opset}-{dtype}.onnx"
    layer = LAYER[block] if layer is None else layer
    return ox.export_onnx(block=block, layer=layer, out=out, checkpoint=None if ckpt is None else str(ckpt),
                          config=config, opset=opset, dtype=dtype, seq_len=7, do_verify=verify)


def _check_names_and_metadata(res, block, layer, dtype, opset, source_contains):
    proto = onnx.load(str(res.path))
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    cfg = json.loads({p.key: p.value for p in proto.metadata_props}["dsv3.config"])
    specs = checkpoint_inventory(resolve_config_from_dict(cfg))
    weights = [n for n in inits if n.startswith("model.") and not n.endswith("rope_inv_freq")]
    assert weights, inits
    prefix = f"model.layers.{layer}."
    for n in weights:  # every weight initializer is a checkpoint tensor, with the checkpoint's shape
        assert n.startswith(prefix) and n in specs, n
        assert tuple(inits[n]) == specs[n].shape, (n, inits[n], specs[n].shape)
    anonymous = [n for n in inits if not n.startswith("model.")]
    assert all(np.prod(inits[n]) <= 64 for n in anonymous), [(n, inits[n]) for n in anonymous]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["dsv3.block"] == block and meta["dsv3.layer"] == str(layer)
    assert meta["dsv3.dtype"] == dtype and meta["dsv3.opset"] == str(opset)
    assert source_contains in meta["dsv3.source"]
    assert [o.version for o in proto.opset_import if o.domain == ""] == [opset]
    return weights


def resolve_config_from_dict(d):
    from dsv3.config import ModelConfig

    return ModelConfig.from_hf_dict(d)


@pytest.fixture(scope="module")
def tiny_fp8(random_checkpoint):
    return random_checkpoint("tiny", "fp8")


@pytest.mark.parametrize("opset", [20, 23])
@pytest.mark.parametrize("block", ["attention", "dense-mlp", "dense-layer", "shared-expert", "router"])
def test_every_block_fp32(tmp_path, tiny_fp8, block, opset):
    res = _export(tmp_path, block, ckpt=tiny_fp8, opset=opset)
    assert res.verify["ok"], res.verify
    assert res.verify["rel"] <= 1e-4 and res.verify["tolerance"] == 1e-4
    assert len(res.verify["runs"]) == 2  # two (batch, seq) shapes through the same graph
    weights = _check_names_and_metadata(res, block, LAYER[block], "fp32", opset, str(tiny_fp8.name))
    expected = {"attention": 7, "dense-mlp": 3, "dense-layer": 12, "shared-expert": 3, "router": 2}[block]
    assert len(weights) == expected, weights
    s = res.summary
    assert s["inputs"] == [("hidden_states", "float", ["batch", "seq", 256])]
    if block == "router":
        assert [o[0] for o in s["outputs"]] == ["topk_idx", "topk_weight"]
        assert s["outputs"][0][1] == "int64" and s["outputs"][0][2] == ["batch", "seq", 4]
        assert "TopK" in s["ops"]
    else:
        assert s["outputs"] == [("output", "float", ["batch", "seq", 256])]
        assert "MatMul" in s["ops"]
    assert not any(op.startswith("fp8") or "dsv3" in op for op in s["ops"])


@pytest.mark.parametrize("block,opset", [("attention", 20), ("dense-mlp", 20), ("dense-layer", 23), ("router", 23)])
def test_fp16(tmp_path, tiny_fp8, block, opset):
    res = _export(tmp_path, block, ckpt=tiny_fp8, opset=opset, dtype="fp16")
    assert res.verify["ok"], res.verify
    assert res.verify["tolerance"] == 1e-2 and res.verify["rel"] <= 1e-2
    assert res.summary["inputs"][0][1] == "float16"
    _check_names_and_metadata(res, block, LAYER[block], "fp16", opset, tiny_fp8.name)


def test_noqlora_attention_and_v2_router(tmp_path, random_checkpoint):
    ck = random_checkpoint("tiny-noqlora", "bf16")
    res = _export(tmp_path, "attention", ckpt=ck, opset=23)
    assert res.verify["ok"], res.verify
    names = _check_names_and_metadata(res, "attention", 0, "fp32", 23, ck.name)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("q_a_proj" in n for n in names)

    ck2 = random_checkpoint("tiny-v2", "bf16")
    res = _export(tmp_path, "router", ckpt=ck2, opset=20, layer=2)
    assert res.verify["ok"], res.verify
    assert all(r["index_mismatch_tokens"] == 0 for r in res.verify["runs"])
    assert "Softmax" in res.summary["ops"] and "ReduceMax" in res.summary["ops"]  # softmax scores, group max
    names = _check_names_and_metadata(res, "router", 2, "fp32", 20, ck2.name)
    assert names == ["model.layers.2.mlp.gate.weight"]  # group_limited_greedy: no correction bias


def test_blocks_match_the_model(random_checkpoint):
    """The export modules compute what dsv3.model computes (absorbed MLA over the cache, Block, Router)."""
    import dsv3
    from dsv3.export.onnx_export import checkpoint_source

    ck = random_checkpoint("tiny", "bf16")
    model = dsv3.load(ck, dtype=torch.float32, max_seq_len=32, progress=False)
    cfg, get, _ = checkpoint_source(ck)
    x = torch.randn(1, 9, cfg.hidden_size)
    pos = torch.arange(9).unsqueeze(0)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    with torch.no_grad():
        blk = model.layers[0]
        model.reset_caches()
        ref_attn = blk.self_attn(x, pos, cos, sin)
        model.reset_caches()
        ref_layer, _ = blk(x, pos, cos, sin)
        ref_idx, ref_w = model.layers[1].mlp.gate(x.view(-1, cfg.hidden_size))
        attn = ExportBlock(cfg, "attention", 0, get, torch.float32)(x)
        layer = ExportBlock(cfg, "dense-layer", 0, get, torch.float32)(x)
        idx, w = ExportBlock(cfg, "router", 1, get, torch.float32)(x)
        shared = ExportBlock(cfg, "shared-expert", 1, get, torch.float32)(x)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer, ref_layer, rtol=1e-4, atol=1e-5)
    assert torch.equal(idx.view(-1, idx.shape[-1]), ref_idx)
    torch.testing.assert_close(w.view(-1, w.shape[-1]), ref_w)
    torch.testing.assert_close(shared, model.layers[1].mlp.shared_experts(x), rtol=1e-4, atol=1e-6)


def test_dynamic_shapes_in_onnxruntime(tmp_path, tiny_fp8):
    res = _export(tmp_path, "attention", ckpt=tiny_fp8, opset=20, verify=False)
    assert res.verify is None
    _, get, _ = ox.checkpoint_source(tiny_fp8)
    module = ExportBlock(resolve_config_from_dict(json.loads(res.summary["metadata"]["dsv3.config"])),
                         "attention", 0, get, torch.float32)
    for b, s in [(3, 5), (1, 1), (2, 33)]:
        x = torch.randn(b, s, 256)
        (got,) = ox.run_onnx(res.path, x)
        assert got.shape == (b, s, 256)
        with torch.no_grad():
            np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-4, atol=1e-5)


def test_external_data(tmp_path, tiny_fp8, monkeypatch):
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 0)  # pretend the weights are over 2 GB
    res = _export(tmp_path, "dense-mlp", ckpt=tiny_fp8)
    assert res.summary["external_data"] and res.verify["ok"]
    assert res.path.stat().st_size < 100_000 and res.summary["file_bytes"] > 393_216 * 4


def test_config_source_equals_init_random(random_checkpoint):
    ck = random_checkpoint("tiny", "fp8")
    _, from_ckpt, _ = ox.checkpoint_source(ck)
    _, from_cfg, src = ox.config_source("tiny")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    # the shipped tiny config is bf16; the fp8 checkpoint is its quantized version: equal up to fp8 rounding
    torch.testing.assert_close(from_cfg(name), from_ckpt(name), rtol=0.07, atol=1e-3)
    assert src.startswith("config:tiny")


def test_cli(tmp_path, tiny_fp8):
    from click.testing import CliRunner

    from dsv3.cli import main

    out = tmp_path / "mlp.onnx"
    r = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(tiny_fp8), "--block", "dense-mlp", "--layer",
                                  "0", "--out", str(out), "--opset", "23", "--seq-len", "5"])
    assert r.exit_code == 0, r.output
    assert out.exists()
    assert "ops (" in r.output and "MatMul 3" in r.output
    assert "parameters: 393,216 in 3 initializers" in r.output
    assert "input: hidden_states float [batch, seq, 256]" in r.output
    assert "output: output float [batch, seq, 256]" in r.output
    assert "file size:" in r.output and "verify: passed" in r.output and "max abs" in r.output

    r = CliRunner().invoke(main, ["export-onnx", "--config", "tiny", "--block", "dense-mlp", "--layer", "2",
                                  "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2
    assert "layer 2 is an MoE layer" in r.output and "first_k_dense_replace = 1" in r.output
    assert not (tmp_path / "x.onnx").exists()

    r = CliRunner().invoke(main, ["export-onnx", "--block", "router", "--layer", "1", "--out", str(out)])
    assert r.exit_code != 0 and "exactly one of --checkpoint or --config" in r.output

    with pytest.raises(ExportError, match="router.*layer 0 is a dense layer"):
        ox.export_onnx(block="router", layer=0, out=tmp_path / "y.onnx", config="tiny")


def test_verify_fails_above_tolerance(tmp_path, tiny_fp8, monkeypatch):
    monkeypatch.setitem(ox.TOLERANCE, "fp32", 0.0)
    res = _export(tmp_path, "dense-mlp", ckpt=tiny_fp8)
    assert not res.ok and "FAILED" in ox.format_verify(res.verify)


def test_16b_dense_layer_shapes(tmp_path):
    """Real-size shapes: layer 0 of 16B (V2-Lite, q_proj) exported from random weights, no ORT run."""
    cfg = resolve_config("16B")
    res = _export(tmp_path, "dense-layer", config="16B", dtype="fp16", verify=False)
    s = res.summary
    assert s["inputs"] == [("hidden_states", "float16", ["batch", "seq", 2048])]
    assert s["outputs"] == [("output", "float16", ["batch", "seq", 2048])]
    proto = onnx.load(str(res.path), load_external_data=False)
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    specs = checkpoint_inventory(cfg)
    expected = [n for n in specs if n.startswith("model.layers.0.")]
    assert len(expected) == 10  # q_proj (no q LoRA), kv LoRA, o_proj, two norms, kv norm, three MLP weights
    for n in expected:
        assert inits[n] == specs[n].shape, n
    assert inits["model.layers.0.self_attn.q_proj.weight"] == (16 * 192, 2048)
    assert inits["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)
    assert s["parameters"] >= sum(int(np.prod(specs[n].shape)) for n in expected)
    assert not s["external_data"] and s["file_bytes"] > 150e6
    onnx.checker.check_model(str(res.path), full_check=False)


# ---------------------------------------------------------------------- --keep-fp8: dsv3.fp8_linear as plain ONNX
@pytest.mark.parametrize("block,opset", [("dense-mlp", 20), ("attention", 23), ("shared-expert", 20)])
def test_keep_fp8_maps_the_project_op(tmp_path, random_checkpoint, block, opset):
    ckpt = random_checkpoint("tiny-ragged", "fp8")  # K=200/344/72: partial 128-blocks everywhere
    layer = 0 if block != "shared-expert" else 2
    res = ox.export_onnx(block=block, layer=layer, out=tmp_path / f"{block}.onnx", checkpoint=str(ckpt),
                         opset=opset, seq_len=7, do_verify=True, keep_fp8=True)
    assert res.ok, res.verify
    proto = onnx.load(str(res.path))
    inits = {i.name: i for i in proto.graph.initializer}
    fp8 = [n for n, i in inits.items() if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert fp8 and all(n.endswith(".weight") for n in fp8)
    for n in fp8:  # each FP8 weight travels with its checkpoint-named block scales, nothing dequantized ahead
        scale = inits[n + "_scale_inv"]
        assert scale.data_type == onnx.TensorProto.FLOAT
        assert list(scale.dims) == [-(-d // 128) for d in inits[n].dims]
    # besides the weights only small constants: the 1-D element -> block index tables of the scale Gathers
    assert not [n for n, i in inits.items() if not n.startswith("model.") and np.prod(i.dims) > 64
                and (len(i.dims) != 1 or i.data_type != onnx.TensorProto.INT64)]
    assert "Cast" in {node.op_type for node in proto.graph.node}
    assert not [node for node in proto.graph.node if node.domain.startswith("dsv3")]


def test_keep_fp8_needs_an_fp8_checkpoint(tmp_path, random_checkpoint):
    with pytest.raises(ExportError, match="not an FP8 checkpoint"):
        ox.export_onnx(block="dense-mlp", layer=0, out=tmp_path / "x.onnx",
                       checkpoint=str(random_checkpoint("tiny", "bf16")), keep_fp8=True)
    with pytest.raises(ExportError, match="needs --checkpoint"):
        ox.export_onnx(block="dense-mlp", layer=0, out=tmp_path / "y.onnx", config="tiny", keep_fp8=True)
