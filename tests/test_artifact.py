"""Results saved as data (source.json + plan.json + model.safetensors) reload without unpickling."""
from __future__ import annotations

import json

import pytest
import torch

import vitgraph
from vitgraph.artifact import Source, load, nested, save
from vitgraph.models import load_model_and_source

from helpers import random_plan, rel_err

TINY = Source("timm", "vit_tiny_patch16_224",
              {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 10}, (3, 32, 32))
KINDS = ("residual", "head", "qk", "v", "ffn")


def _slim(source: Source, seed: int):
    torch.manual_seed(seed)
    model = source.build()
    x = torch.randn(2, *source.input_size)
    plan = random_plan(vitgraph.analyze(model, x[:1]), KINDS, seed=seed)
    slim = vitgraph.compress(model, plan)
    with torch.no_grad():  # weights the rebuilt random model cannot have: a fine-tune stand-in
        for p in slim.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return slim, plan, x


def test_save_load_roundtrip_and_prune_again(tmp_path):
    slim, plan, x = _slim(TINY, 1)
    save(tmp_path / "a", slim, plan, TINY)
    assert not list((tmp_path / "a").glob("*.pt"))
    back = load(tmp_path / "a")
    assert rel_err(back(x), slim(x)) <= 1e-6
    assert not back.training

    # an OUT directory is a model spec: pruned again, its recipe nests the first plan
    model, x1, source = load_model_and_source(str(tmp_path / "a"))
    assert source.kind == "vitgraph" and source.base == TINY and tuple(x1.shape[1:]) == (3, 32, 32)
    assert rel_err(model(x), slim(x)) <= 1e-6
    an = vitgraph.analyze(model, x1)
    plan2 = random_plan(an, ("ffn",), seed=2)
    slim2 = vitgraph.compress(model, plan2)
    save(tmp_path / "b", slim2, plan2, source)
    assert json.loads((tmp_path / "b" / "source.json").read_text())["base"]["name"] == "vit_tiny_patch16_224"
    assert rel_err(load(tmp_path / "b")(x), slim2(x)) <= 1e-6
    assert sum(p.numel() for p in slim2.parameters()) < sum(p.numel() for p in slim.parameters())


def test_bad_artifacts_name_the_problem(tmp_path):
    slim, plan, _ = _slim(TINY, 3)
    out = save(tmp_path / "a", slim, plan, TINY)
    with pytest.raises(vitgraph.VitgraphError, match="not a vitgraph result"):
        load(tmp_path)
    src = json.loads((out / "source.json").read_text())
    (out / "source.json").write_text(json.dumps(src | {"kind": "pickle"}))
    with pytest.raises(vitgraph.VitgraphError, match="'kind'"):
        load(out)
    (out / "source.json").write_text(json.dumps(src | {"vitgraph_source": 9}))
    with pytest.raises(vitgraph.VitgraphError, match="vitgraph_source"):
        load(out)
    # weights of another plan do not fit the architecture this source and plan rebuild
    dense = TINY.build()
    (out / "source.json").write_text(json.dumps(src))
    save(tmp_path / "b", vitgraph.compress(dense, vitgraph.Plan.keep_all(vitgraph.analyze(dense, torch.randn(1, 3, 32, 32)))),
         plan, TINY)
    (out / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(vitgraph.VitgraphError, match="does not fit"):
        load(out)


def test_nested_source_rebuilds_the_slim_architecture():
    slim, plan, x = _slim(TINY, 5)
    rebuilt = nested(TINY, plan).build()
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in slim.parameters()]


ARGS = dict(TINY.kwargs)


def test_checkpoints_and_model_args(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(7)
    trained = TINY.build()
    wrapped = {"state_dict": {"module." + k: v for k, v in trained.state_dict().items()}}  # a DDP training checkpoint
    torch.save(wrapped, tmp_path / "ck.pth")
    save_file(trained.state_dict(), str(tmp_path / "ck.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for ck in ("ck.pth", "ck.safetensors"):
        model, x1, source = load_model_and_source("vit_tiny_patch16_224", model_args=ARGS, checkpoint=str(tmp_path / ck))
        assert source == TINY and tuple(x1.shape) == (1, 3, 32, 32)
        assert rel_err(model(x), trained(x)) == 0
    torch.save(trained, tmp_path / "pickled.pt")
    with pytest.raises(vitgraph.VitgraphError, match="no pickled code"):
        load_model_and_source("vit_tiny_patch16_224", model_args=ARGS, checkpoint=str(tmp_path / "pickled.pt"))
    with pytest.raises(vitgraph.VitgraphError, match="does not fit"):
        load_model_and_source("vit_tiny_patch16_224", model_args=ARGS | {"embed_dim": 24},
                              checkpoint=str(tmp_path / "ck.safetensors"))
    with pytest.raises(vitgraph.VitgraphError, match="does not exist"):
        load_model_and_source("vit_tiny_patch16_224", model_args=ARGS, checkpoint=str(tmp_path / "missing.pth"))
