"""The fast paths of analysis, planning and compression give what the plain code gives.

Shape propagation's memo (vitgraph.capture.shape_memo), the chunked squared norms of the magnitude
scores and the numpy gather of the slim pass are checked against the computations they replace.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitgraph
from vitgraph.capture import shape_memo
from vitgraph.capture.tracer import VALUE_KEY
from vitgraph.planning.magnitude import _sq_norms_of_dims, slice_sq_norms
from vitgraph.analysis.ops.rewriting import slice_kept

from helpers import tiny_vit


def _metas(an: vitgraph.Analysis) -> list:
    return [(n.name, str(n.meta.get("tensor_meta")), repr(n.meta.get(VALUE_KEY))) for n in an.graph_module.graph.nodes]


def _analyze_both(monkeypatch: pytest.MonkeyPatch, model: nn.Module, x: torch.Tensor) -> tuple:
    memo = vitgraph.analyze(model, x)
    with monkeypatch.context() as mp:
        mp.setattr(shape_memo.ShapeMemo, "run", lambda self, op, target, args, kwargs, call, module=None: call())
        plain = vitgraph.analyze(model, x)
    return memo, plain


class _InPlace(nn.Module):
    """Repeated blocks whose in-place and aliasing ops a memo must not skip."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.act = nn.ReLU(inplace=True)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fc:
            y = fc(x)
            y.unsqueeze_(0)  # changes y's shape in place
            y = y.squeeze(0)
            z = y.contiguous()  # (returns y itself)
            z.transpose_(0, 1)  # so y is transposed too
            y = y.t()
            y = F.relu(y, inplace=True)
            y = self.act(y)
            x = x + y * self.scale
            x.mul_(0.5)
        return x


def test_shape_memo_matches_plain_propagation(monkeypatch):
    for model, x in [(tiny_vit().eval(), torch.randn(1, 3, 32, 32)), (_InPlace().eval(), torch.randn(4, 8))]:
        memo, plain = _analyze_both(monkeypatch, model, x)
        assert _metas(memo) == _metas(plain)
        assert [(g.id, g.size) for g in memo.groups] == [(g.id, g.size) for g in plain.groups]
        assert memo.fingerprint == plain.fingerprint
        req = {n.name: n.meta["tensor_meta"].requires_grad for n in memo.graph_module.graph.nodes
               if n.op == "get_attr" and "tensor_meta" in n.meta}
        assert req and not any(req.values())  # (propagated on the meta device, not run for real)


def test_shape_memo_answers_repeated_blocks():
    memo = shape_memo.ShapeMemo()
    lin = [nn.Linear(8, 4) for _ in range(2)]
    x = torch.empty(2, 8, device="meta")
    calls = []

    def run(m):
        def call():
            calls.append(m)
            return F.linear(x, m.weight.to("meta"), m.bias.to("meta"))
        return memo.run("call_module", "fc", (x,), {}, call, module=m)

    a, b = run(lin[0]), run(lin[1])
    assert len(calls) == 1 and a is not b and a.shape == b.shape == (2, 4) and a.stride() == b.stride()
    lin[1].register_forward_hook(lambda *a: None)
    run(lin[1])
    assert len(calls) == 2  # (a module with hooks runs)
    y = torch.empty(3, device="meta")
    assert memo.run("call_method", "add_", (y, 1), {}, lambda: y) is y
    assert memo.run("call_method", "add_", (y, 1), {}, lambda: "ran") == "ran"  # (in-place ops always run)
    assert memo.run("call_function", torch.relu, (y,), {"inplace": True}, lambda: "ran") == "ran"


@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072), (40000, 1), (1, 40000), (9000, 7), (9000, 16), (5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_sq_norms_are_bit_identical(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=gen) * 3).to(dtype)
    got = _sq_norms_of_dims(t, {0, 1})
    for d in (0, 1):
        assert np.array_equal(got[d], slice_sq_norms(t, d))


def test_numpy_gather_equals_index_select():
    gen = np.random.default_rng(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool):
        for shape in [(12,), (6, 8), (4, 6, 8)]:
            for p in (False, True):
                t = (torch.randn(shape) * 5).to(dtype)
                t = nn.Parameter(t) if p and dtype.is_floating_point else t
                kept = [np.sort(gen.choice(n, max(1, n // 2), replace=False)) for n in t.shape]
                ref = t.detach()
                for d, idx in enumerate(kept):
                    ref = ref.index_select(d, torch.as_tensor(idx))
                out = slice_kept(t, kept)
                assert type(out) is type(t) and out.dtype == t.dtype and out.is_contiguous()
                assert torch.equal(out.detach(), ref) and out.requires_grad == t.requires_grad
    with pytest.raises(IndexError):
        slice_kept(torch.randn(4, 4), [np.array([0, 9]), None])


def _tree(x, seen=None, path="root") -> list:
    """Every object under ``x``: types, keys, tensor values and which objects are shared."""
    seen = {} if seen is None else seen
    if isinstance(x, (nn.Module, dict, list, set, torch.Tensor)):
        if id(x) in seen:
            return [(path, "shared with", seen[id(x)])]
        seen[id(x)] = path
    if isinstance(x, nn.Module):
        return [(path, type(x), tuple(x.__dict__))] + [e for k, v in x.__dict__.items() for e in _tree(v, seen, f"{path}.{k}")]
    if isinstance(x, torch.Tensor):
        return [(path, type(x), x.dtype, tuple(x.shape), x.requires_grad, x.detach().tolist())]
    if isinstance(x, dict):
        return [(path, type(x), tuple(x))] + [e for k, v in x.items() for e in _tree(v, seen, f"{path}[{k}]")]
    if isinstance(x, (list, tuple)):
        return [(path, type(x), len(x))] + [e for i, v in enumerate(x) for e in _tree(v, seen, f"{path}[{i}]")]
    if isinstance(x, set):
        return [(path, set, sorted(map(repr, x)))]
    return [(path, type(x), repr(x))]


class _OwnCopy(nn.Linear):
    def __deepcopy__(self, memo):
        out = nn.Linear(self.in_features, self.out_features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        out.copied = True
        return out


def test_module_copy_equals_deepcopy():
    from vitgraph.passes.slim import _deepcopy

    m = tiny_vit().eval()
    an = vitgraph.analyze(m, torch.randn(1, 3, 32, 32))
    shared = nn.Linear(4, 4)
    extra = nn.Module()
    extra.a, extra.b, extra.own = shared, shared, _OwnCopy(2, 2)  # (shared submodule, custom copy)
    extra.cache = {"k": [1, (2, shared.weight)]}
    extra.register_buffer("idx", torch.arange(3), persistent=False)
    for root in list(an.graph_module.children()) + [extra]:
        stand_in = torch.zeros(1)  # (a sliced weight, as compress puts in the memo)
        memo = {id(p): stand_in for p in list(root.parameters())[:1]}
        ours, ref = _deepcopy(root, dict(memo)), copy.deepcopy(root, dict(memo))
        assert _tree(ours) == _tree(ref)
        assert not any(a is b for a, b in zip(ours.parameters(), root.parameters()))
    assert ours.own.copied and ours.a is ours.b and ours.cache["k"][1][1] is ours.a.weight


def test_magnitude_scores_equal_the_plain_computation():
    """Per group, the squared norms summed parameter by parameter as the plain code does."""
    from vitgraph.planning.magnitude import magnitude_scores
    from vitgraph.analysis.selection import layout_coords

    m = tiny_vit(embed_dim=96, mlp_ratio=8.0).eval()  # (fc weights big enough to be squared in blocks)
    with torch.no_grad():
        m.blocks[0].norm1.weight.fill_(1.0)  # (ties must stay ties)
    an = vitgraph.analyze(m, torch.randn(1, 3, 32, 32))
    tensors = dict(an.graph_module.named_parameters())
    got = magnitude_scores(an)
    for g in an.groups:
        head = an.group(g.head_group) if g.per_head else None
        acc = np.zeros((head.size, g.size) if head else g.size)
        for name, dim in g.params:
            sq = slice_sq_norms(tensors[name], dim)
            _, coords = layout_coords(an.store, an.params[name].dims[dim])
            c = coords[g.axis]
            valid = c >= 0
            if head is not None and head.axis in coords:
                h = coords[head.axis]
                both = valid & (h >= 0)
                np.add.at(acc, (h[both], c[both]), sq[both])
            elif head is not None:
                acc += np.bincount(c[valid], weights=sq[valid], minlength=g.size)[None, :] / head.size
            else:
                np.add.at(acc, c[valid], sq[valid])
        assert torch.equal(got[g.id], torch.from_numpy(acc).sqrt()), g.id
