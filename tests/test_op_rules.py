"""Op rules on small synthetic models, one pattern each.

Every model maps tokens ``[B, N, CIN]`` through ``embed`` to a residual stream, runs one block
that uses the pattern under test, and ends in a ``head`` Linear (``helpers.Net``).  Each test checks

* the groups the analysis finds (kinds and sizes), or what it freezes and why, and
* that compressing equals masking (max relative error <= 1e-5) for random keep-sets of the
  qk / v / head / ffn groups that are not ``normalized``, that the output shape is unchanged,
  and that the identity plan reproduces the model exactly.

"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import vitgraph

from helpers import (B, C, D, H, INNER, N, NCLS, Net, SeparateQKV, assert_exact, build, inputs, kinds_and_sizes, merge_heads,
                     only, rel_err, rotate_pairs, split_heads)


# ---------------------------------------------------------------------------------------------
# 1. BEiT-style fused qkv: bias-free Linear, bias concatenated from q_bias, zeros and v_bias


class BeitAttention(nn.Module):
    """``F.linear(x, qkv.weight, cat(q_bias, <zeros>, v_bias))``, unbind, SDPA.

    ``zeros`` is ``"zeros_like"`` (BEiT: ``torch.zeros_like(v_bias)``) or ``"buffer"`` (timm: a
    registered all-zero ``k_bias`` buffer).
    """

    def __init__(self, zeros: str = "zeros_like") -> None:
        super().__init__()
        self.zeros = zeros
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.randn(C))
        self.v_bias = nn.Parameter(torch.randn(C))
        if zeros == "buffer":
            self.register_buffer("k_bias", torch.zeros(C), persistent=False)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        k_bias = torch.zeros_like(self.v_bias) if self.zeros == "zeros_like" else self.k_bias
        qkv_bias = torch.cat((self.q_bias, k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("zeros", ["zeros_like", "buffer"])
def test_beit_fused_qkv_with_concatenated_bias(zeros):
    """Groups head/qk/v; q_bias and v_bias are sliced with their own sections.

    ``zeros_like(v_bias)`` as the k bias follows v_bias's size at run time, so there k's dims
    are tied to v's (one group); a separate buffer leaves qk and v apart.
    """
    m = build(BeitAttention, zeros)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    qk = only(an, "qk")
    assert ("block.q_bias", 0) in qk.params and qk.per_head
    if zeros == "buffer":
        assert kinds_and_sizes(an) == [("head", H), ("qk", D), ("residual", C), ("v", D)], str(an)
        v = only(an, "v")
        assert v.per_head and ("block.v_bias", 0) in v.params
        assert ("block.v_bias", 0) not in qk.params and ("block.q_bias", 0) not in v.params
    else:
        assert kinds_and_sizes(an) == [("head", H), ("qk", D), ("residual", C)], str(an)
        assert ("block.v_bias", 0) in qk.params
    assert_exact(m, an)


# ---------------------------------------------------------------------------------------------
# 2. rotary embeddings on q and k


def rope_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """``sin`` / ``cos`` of shape [N, D], each angle repeated for channels 2i and 2i+1."""
    inv = 1.0 / (100.0 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(N).float()[:, None] * inv[None, :]
    ang = ang.repeat_interleave(2, -1)
    return ang.sin(), ang.cos()


class RopeAttention(nn.Module):
    """Fused qkv; ``x * cos + rotate_pairs(x) * sin`` on q and k; explicit softmax attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        sin, cos = rope_tables()
        self.register_buffer("sin", sin)
        self.register_buffer("cos", cos)

    def rope(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.cos + rotate_pairs(t) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.rope(q), self.rope(k)
        attn = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1)
        return x + self.proj(merge_heads(attn @ v))


def test_rotary_embedding_groups_channel_pairs():
    """The qk group counts channel pairs (D / 2); the position inside a pair is frozen."""
    m = build(RopeAttention)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("head", H), ("qk", D // 2), ("residual", C), ("v", D)], str(an)
    qk = only(an, "qk")
    assert {"block.sin", "block.cos"} <= {p for p, _ in qk.params}
    assert any("position inside groups of 2" in f.reason for f in an.frozen), an.explain_frozen()
    assert_exact(m, an, seeds=range(6))


def test_rotary_pruning_matches_removing_pairs_by_hand():
    """Keeping pairs P of the qk group equals zeroing q/k rows 2p, 2p+1 for p not in P."""
    m = build(RopeAttention)
    an = vitgraph.analyze(m, inputs(1))
    qk = only(an, "qk")
    pairs = [0, 2, 3]
    plan = vitgraph.Plan.keep_all(an).keep(qk.id, pairs)
    slim = vitgraph.compress(m, plan, an)
    ref = build(RopeAttention)
    drop = [2 * p + j for p in range(D // 2) if p not in pairs for j in (0, 1)]
    with torch.no_grad():
        for sec in (0, 1):  # q and k
            for h in range(H):
                rows = [sec * C + h * D + d for d in drop]
                ref.block.qkv.weight[rows] = 0
                ref.block.qkv.bias[rows] = 0
    x = inputs()
    with torch.no_grad():
        assert rel_err(slim(x), ref(x)) <= 1e-5
    w = dict(slim.named_parameters())["block.qkv.weight"]
    assert w.shape == (2 * H * 2 * len(pairs) + C, C)


# ---------------------------------------------------------------------------------------------
# 3. type_as


class TypeAsMLPs(nn.Module):
    """Two parallel MLPs of equal width; one hidden activation is cast with ``type_as`` the other."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)
        self.fc3, self.fc4 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.gelu(self.fc1(x))
        b = F.gelu(self.fc3(x))
        return x + self.fc2(a.type_as(b)) + self.fc4(b)


def test_type_as_does_not_tie_its_operands():
    """``a.type_as(b)`` only casts: the two hidden layers stay separate ffn groups."""
    m = build(TypeAsMLPs)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("ffn", 24), ("ffn", 24), ("residual", C)], str(an)
    owners = sorted(sorted({p.rpartition(".")[0] for p, _ in g.params}) for g in an.groups if g.kind == "ffn")
    assert owners == [["block.fc1", "block.fc2"], ["block.fc3", "block.fc4"]]
    assert_exact(m, an)


# ---------------------------------------------------------------------------------------------
# 4. cosine attention: F.normalize on q and k


class CosineAttention(nn.Module):
    """Separate q/k/v projections; ``normalize(q) @ normalize(k)^T * scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = (attn * self.logit_scale.exp()).softmax(-1)
        return x + self.proj(merge_heads(attn @ v))


def test_cosine_attention_marks_qk_normalized():
    """The qk group is ``normalized``; v, head and residual are not."""
    m = build(CosineAttention)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("head", H), ("qk", D), ("residual", C), ("v", D)], str(an)
    assert only(an, "qk").normalized
    assert not only(an, "v").normalized and not only(an, "head").normalized
    assert not only(an, "residual").normalized
    assert_exact(m, an)
    # pruning the normalised qk group still compresses and runs (no equivalence claim)
    plan = vitgraph.Plan.keep_all(an).keep(only(an, "qk").id, [0, 3, 5])
    assert vitgraph.compress(m, plan, an)(inputs()).shape == (B, NCLS)


# ---------------------------------------------------------------------------------------------
# 5. separate q / k / v projections with explicit softmax attention (``helpers.SeparateQKV``)


@pytest.mark.parametrize("heads, dim, dim_v, kt", [
    (H, D, D, "transpose"),
    (H, D, 12, "transpose"),  # v dims differ from q/k dims
    (8, 8, 8, "transpose"),  # as many heads as dims per head
    (H, D, D, "mT"),
    (8, 8, 8, "mT"),
])
def test_separate_q_k_v_projections(heads, dim, dim_v, kt):
    """head/qk/v groups with per-head dims; q and k rows in qk, v rows and proj columns in v."""
    m = build(SeparateQKV, heads, dim, dim_v, kt)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == sorted([("head", heads), ("qk", dim), ("residual", C), ("v", dim_v)]), str(an)
    qk, v, head = only(an, "qk"), only(an, "v"), only(an, "head")
    assert qk.per_head and v.per_head and qk.head_group == v.head_group == head.id
    assert {("block.q.weight", 0), ("block.k.weight", 0), ("block.q.bias", 0), ("block.k.bias", 0)} <= set(qk.params)
    assert {("block.v.weight", 0), ("block.v.bias", 0), ("block.proj.weight", 1)} <= set(v.params)
    assert_exact(m, an)


def test_separate_q_k_v_slim_shapes():
    """Keeping 2 heads and 3 qk / 5 v dims per head gives the expected weight shapes."""
    m = build(SeparateQKV)
    an = vitgraph.analyze(m, inputs(1))
    qk, v, head = only(an, "qk"), only(an, "v"), only(an, "head")
    plan = vitgraph.Plan.keep_all(an).keep(head.id, [1, 3])
    plan.keep(qk.id, [[0, 1, 2], [1, 4, 7], [2, 3, 6], [0, 5, 7]]).keep(v.id, [[0, 1, 2, 3, 4]] * H)
    slim = vitgraph.compress(m, plan, an)
    p = dict(slim.named_parameters())
    assert p["block.q.weight"].shape == p["block.k.weight"].shape == (2 * 3, C)
    assert p["block.v.weight"].shape == (2 * 5, C) and p["block.proj.weight"].shape == (C, 2 * 5)
    x = inputs()
    with torch.no_grad():
        assert rel_err(slim(x), vitgraph.mask(m, plan, an)(x)) <= 1e-5


class ComputedShapeQKV(SeparateQKV):
    """Heads split by a shape the graph computes, as symbolic tracing records transformers'
    ``transpose_for_scores``: ``x.view(x.size()[:-1] + (heads, dim))`` (and ``torch.reshape``
    with ``x.shape[:-1] + ...`` for k)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        q = q.view(q.size()[:-1] + (self.heads, self.dim)).transpose(1, 2)
        k = self.k(x)
        k = torch.reshape(k, k.shape[:-1] + (self.heads, self.dim)).transpose(1, 2)
        v = self.v(x)
        v = v.view(v.size()[:-1] + (self.heads, self.dim_v)).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.dim ** -0.5
        return x + self.proj(merge_heads(attn.softmax(dim=-1) @ v))


def test_split_heads_by_a_computed_shape():
    """A view/reshape whose whole shape is one graph value gets its elements rewritten."""
    from vitgraph.capture.trace import FRONT_ENDS

    m = build(ComputedShapeQKV, H, D, 12)
    an = vitgraph.analyze(m, inputs(1))
    assert an.front_end == FRONT_ENDS[0]  # (the shape is a node, not a tuple of sizes)
    assert kinds_and_sizes(an) == sorted([("head", H), ("qk", D), ("residual", C), ("v", 12)]), str(an)
    assert_exact(m, an)
    plan = vitgraph.Plan.random(an, 0.5, kinds=INNER, seed=0)
    slim = vitgraph.compress(m, plan, an)
    with torch.no_grad():  # the batch stays dynamic
        assert rel_err(slim(inputs(3)), vitgraph.mask(m, plan, an)(inputs(3))) <= 1e-5


class PooledQueryAttention(SeparateQKV):
    """Query pooling by a max over token groups (Hiera): ``q.view(..., 3, N // 3, D).max(dim=2).values``,
    the residual pooled the same way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.dim).transpose(1, 2)
        q = q.view(b, self.heads, 3, n // 3, self.dim).max(dim=2).values
        k = self.k(x).reshape(b, n, self.heads, self.dim).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, self.dim_v).transpose(1, 2)
        o = merge_heads((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v)
        return x.view(b, 3, n // 3, c).max(dim=1).values + self.proj(o)


def test_values_of_a_max_over_tokens_keep_channels():
    """``.values`` of torch's (values, indices) result carries the channels of the reduced tensor."""
    m = build(PooledQueryAttention, H, D, 12)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == sorted([("head", H), ("qk", D), ("residual", C), ("v", 12)]), str(an)
    assert_exact(m, an)


class EinsumAttention(SeparateQKV):
    """Attention written as two einsums (CvT): ``bhlk,bhtk->bhlt`` then ``bhlt,bhtv->bhlv``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.dim).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.heads, self.dim).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, self.dim_v).transpose(1, 2)
        attn = torch.einsum("bhlk,bhtk->bhlt", [q, k]) * self.dim ** -0.5
        return x + self.proj(merge_heads(torch.einsum("bhlt,bhtv->bhlv", attn.softmax(dim=-1), v)))


def test_einsum_attention_finds_heads_and_values():
    """Einsums between two activations give matmul's roles: head, qk and v groups."""
    m = build(EinsumAttention, H, D, 12)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == sorted([("head", H), ("qk", D), ("residual", C), ("v", 12)]), str(an)
    qk, v, head = only(an, "qk"), only(an, "v"), only(an, "head")
    assert qk.per_head and v.per_head and qk.head_group == v.head_group == head.id
    assert_exact(m, an)


# ---------------------------------------------------------------------------------------------
# 6. LayerScale on the residual branch and a SwiGLU MLP


class LayerScaleSwiGLU(nn.Module):
    """``x + gamma * fc2(silu(a) * b)`` with ``a, b = fc1(norm(x)).chunk(2, -1)``."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.fc1 = nn.Linear(C, 2 * hidden)
        self.fc2 = nn.Linear(hidden, C)
        self.gamma = nn.Parameter(torch.full((C,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(self.norm(x)).chunk(2, -1)
        return x + self.gamma * self.fc2(F.silu(a) * b)


def test_layerscale_and_swiglu():
    """One ffn group of ``hidden`` units (gate and value halves tied); gamma is residual."""
    m = build(LayerScaleSwiGLU)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    ffn, res = only(an, "ffn"), only(an, "residual")
    assert {("block.fc1.weight", 0), ("block.fc1.bias", 0), ("block.fc2.weight", 1)} <= set(ffn.params)
    assert ("block.gamma", 0) in res.params and res.normalized
    assert_exact(m, an)
    plan = vitgraph.Plan.keep_all(an).keep(ffn.id, [0, 5, 23])
    slim = vitgraph.compress(m, plan, an)
    p = dict(slim.named_parameters())
    assert p["block.fc1.weight"].shape == (6, C) and p["block.fc2.weight"].shape == (C, 3)
    ref = build(LayerScaleSwiGLU)
    rows = [i for i in range(24) if i not in (0, 5, 23)]
    with torch.no_grad():  # removing unit i = zeroing both halves' rows i and 24 + i
        ref.block.fc1.weight[rows + [24 + i for i in rows]] = 0
        ref.block.fc1.bias[rows + [24 + i for i in rows]] = 0
        assert rel_err(slim(inputs()), ref(inputs())) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 7. an op without a rule


def reverse_channels(t: torch.Tensor) -> torch.Tensor:
    """Opaque to the tracer (``torch.fx.wrap``, and data-dependent control flow keeps it opaque
    even when vitgraph tries to trace inside it): reorders channels, so nothing may be pruned."""
    return t.flip(-1) if bool(t.sum() > -1e30) else t


torch.fx.wrap("reverse_channels")


class UnruledMLP(nn.Module):
    """MLP whose hidden activation goes through an op without a rule; a second, plain MLP.

    ``op`` is ``"reverse_channels"`` (a wrapped user function) or ``"cummax"`` (a torch op the
    registry has no rule for: ``torch.cummax(h, dim=-1).values``).
    """

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)
        self.fc3, self.fc4 = nn.Linear(C, 16), nn.Linear(16, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        h = reverse_channels(h) if self.op == "reverse_channels" else torch.cummax(h, dim=-1).values
        return x + self.fc2(h) + self.fc4(F.gelu(self.fc3(x)))


@pytest.mark.parametrize("op, target", [("reverse_channels", reverse_channels), ("cummax", torch.cummax)])
def test_op_without_rule_freezes_and_reports(op, target):
    """The call is a graph node without a rule: its channels freeze with that reason, named in
    the analysis' reports, and the rest of the model stays prunable."""
    m = build(UnruledMLP, op)
    an = vitgraph.analyze(m, inputs(1))
    gm_targets = [n.target for n in an.graph_module.graph.nodes if n.op == "call_function"]
    assert target in gm_targets  # traced as one opaque call
    assert any(op in what for _, what in an.unruled), an.unruled
    frozen = [f for f in an.frozen if op in f.reason]
    assert [f.size for f in frozen] == [24], an.explain_frozen()
    assert "block.fc1.weight" in frozen[0].where and "no rule" in frozen[0].reason
    assert op in an.explain_frozen() and op in an.summary()
    # the untouched MLP and the residual stay prunable; the frozen hidden layer is no group
    assert kinds_and_sizes(an) == [("ffn", 16), ("residual", C)], str(an)
    assert not [g for g in an.groups if g.size == 24]
    assert all(("block.fc1.weight", 0) not in g.params for g in an.groups)
    assert_exact(m, an)


def swap_halves(parts: tuple) -> torch.Tensor:
    """Opaque like ``reverse_channels``; takes the tuple ``chunk`` returns as one argument."""
    return torch.cat((parts[1], parts[0]), -1) if bool(parts[0].sum() > -1e30) else torch.cat(parts, -1)


torch.fx.wrap("swap_halves")


class UnruledOnTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(swap_halves(F.gelu(self.fc1(x)).chunk(2, -1)))


def test_op_without_rule_freezes_the_tensors_of_a_tuple_argument():
    """A tuple of tensors (a chunk's parts) passed whole to an op without a rule is frozen too."""
    m = build(UnruledOnTuple)
    an = vitgraph.analyze(m, inputs(1))
    assert any("swap_halves" in what for _, what in an.unruled), an.unruled
    assert sum(f.size for f in an.frozen if "swap_halves" in f.reason) == 24, an.explain_frozen()
    assert kinds_and_sizes(an) == [("residual", C)], str(an)


# ---------------------------------------------------------------------------------------------
# 8. patterns from families off the coverage list (general op semantics, synthetic models)


class OutlookValues(nn.Module):
    """VOLO-style: values unfolded over 3x3 windows (``F.unfold``), weighted per head by
    attention over window positions, folded back (``F.fold``); head dim read from the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Linear(C, C)
        self.attn = nn.Linear(C, H * 9 * 9)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        img = self.v(x).transpose(1, 2).reshape(b, c, 3, 3)
        cols = F.unfold(img, 3, padding=1).reshape(b, H, c // H, 9, n).permute(0, 1, 4, 3, 2)  # B,H,L,9,D
        a = self.attn(x).reshape(b, n, H, 9, 9).permute(0, 2, 1, 3, 4).softmax(-1)  # B,H,L,9,9
        o = (a @ cols).permute(0, 1, 4, 3, 2).reshape(b, c * 9, n)
        o = F.fold(o, (3, 3), 3, padding=1).reshape(b, c, n).transpose(1, 2)
        return x + self.proj(o)


def test_unfold_and_fold_keep_channels_prunable():
    """Channels pass through unfold (outer factor of C x window) and fold (window summed)."""
    m = build(OutlookValues)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    assert ("v", D) in kinds_and_sizes(an) and ("head", H) in kinds_and_sizes(an), str(an)
    assert ("block.v.weight", 0) in only(an, "v").params
    assert_exact(m, an)


class FunctionalBatchNormMLP(nn.Module):
    """MLP whose hidden units go through ``F.batch_norm`` with module-held statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)
        self.weight, self.bias = nn.Parameter(torch.randn(24)), nn.Parameter(torch.randn(24))
        self.register_buffer("running_mean", torch.randn(24))
        self.register_buffer("running_var", torch.rand(24) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).transpose(1, 2)
        h = F.batch_norm(h, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)
        return x + self.fc2(F.gelu(h.transpose(1, 2)))


def test_functional_batch_norm_follows_the_channel_dim():
    m = build(FunctionalBatchNormMLP)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    assert {("block.running_var", 0), ("block.weight", 0)} <= set(only(an, "ffn").params)
    assert_exact(m, an)


class RepeatTokensMLP(nn.Module):
    """Hidden activations repeated along tokens (``repeat_interleave``), then every other kept."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x)).repeat_interleave(2, dim=1)
        return x + self.fc2(h)[:, 1::2]


def test_repeat_interleave_along_tokens_keeps_channels():
    m = build(RepeatTokensMLP)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    assert_exact(m, an)


class PrefixTokens(nn.Module):
    """A class token (one row) and register tokens (a parameter with a token dim) prepended."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.reg = nn.Parameter(torch.randn(1, 4, C))
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), self.reg.expand(b, -1, -1), x], dim=1)
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_cat_of_a_single_token_with_a_parameter_token_dim():
    """The register tokens' token dim is a parameter dim; concatenating it with the one class
    token must not fail: the residual stays one prunable group."""
    m = build(PrefixTokens)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    assert {("block.cls", 2), ("block.reg", 2)} <= set(only(an, "residual").params)
    assert_exact(m, an)


class DimMajorMerge(nn.Module):
    """Attention whose output is merged dim-major (NesT: ``permute(0, 2, 3, 1)`` puts the heads
    last), so ``proj`` sees ``(D, H)``; q/k stay head-major."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, c // H).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)  # B, H, N, D
        return x + self.proj(o.permute(0, 2, 3, 1).reshape(b, n, c))


def test_dim_major_merge_gets_one_value_set_for_all_heads():
    """A (D, H) dim cannot hold different dims per head: v is shared across heads, qk is not;
    random keep-sets (ragged q/k vs v) compress exactly."""
    m = build(DimMajorMerge)
    an = vitgraph.analyze(m, inputs(1))
    assert only(an, "qk").per_head and not only(an, "v").per_head, str(an)
    assert_exact(m, an)


class OptionalMaskNet(Net):
    """``forward(x, mask=None)`` with a branch on the optional argument (Hiera)."""

    def __init__(self) -> None:
        super().__init__(LayerScaleSwiGLU())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask.view(x.shape[0], -1, 1)
        return super().forward(x)


def test_forward_defaults_are_traced_as_constants():
    """Arguments the example inputs do not give keep their defaults while tracing."""
    torch.manual_seed(0)
    m = OptionalMaskNet().eval()
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    assert_exact(m, an)


class TokenConvMLP(nn.Module):
    """An MLP, then a Conv1d whose channels are the tokens: the residual channels are its length.

    ``kernel=1`` maps every channel position on its own (CoaT's aggregation of stage tokens), so
    the residual stays prunable; a wider kernel, or a pooling window, mixes neighbouring channels.
    """

    def __init__(self, kernel: int = 1, pool: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)
        self.mix = nn.Conv1d(N, N, kernel, padding=kernel // 2)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(F.gelu(self.fc1(x)))
        x = self.mix(x)
        return F.avg_pool1d(x, 3, 1, 1) if self.pool else x


def test_conv_across_tokens_keeps_residual_channels_on_its_length():
    m = build(TokenConvMLP)
    an = vitgraph.analyze(m, inputs(1))
    # the conv's own output channels (the mixed tokens) are a group of kind "other"
    assert kinds_and_sizes(an) == [("ffn", 24), ("other", N), ("residual", C)], str(an)
    assert ("head.weight", 1) in only(an, "residual").params
    plan = vitgraph.Plan.random(an, 0.5, seed=0)
    slim = vitgraph.compress(m, plan, an)
    with torch.no_grad():
        assert slim(inputs()).shape == (B, NCLS)
    assert slim.head.in_features == len(plan.kept[only(an, "residual").id])
    assert_exact(m, an)


@pytest.mark.parametrize("kernel,pool", [(3, False), (1, True)])
def test_window_over_channels_freezes_them(kernel, pool):
    m = build(TokenConvMLP, kernel, pool)
    an = vitgraph.analyze(m, inputs(1))
    assert kinds_and_sizes(an) == [("ffn", 24), ("other", N)], str(an)
    why = an.explain("embed.weight")
    assert "kernel window mixes the channels" in why, why
    assert_exact(m, an)


# ---------------------------------------------------------------------------------------------
# SAM-style attention: batch merged with heads, a decomposed position bias from a helper that
# branches on a parameter's shape (registered as not traceable, like timm's get_rel_pos)


from timm.layers import register_notrace_function  # noqa: E402


@register_notrace_function
def table_bias(q: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """``q [B*H, n, D]`` against a relative-position table ``[2n - 1, D]``: bias ``[B*H, n, n]``."""
    if table.shape[0] != 2 * n - 1:  # control flow on a parameter's shape
        table = F.interpolate(table.T[None], size=2 * n - 1, mode="linear")[0].T
    idx = torch.arange(n)[:, None] - torch.arange(n)[None, :] + (n - 1)
    rel = table[idx]  # [n, n, D]
    return torch.einsum("bnd,nmd->bnm", q, rel)[:, :]


class BatchHeadsAttention(nn.Module):
    """``qkv.view(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).reshape(3, B * H, N, -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.table = nn.Parameter(torch.randn(2 * N - 1, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        qkv = self.qkv(x).view(B, n, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * H, n, -1).unbind(0)
        attn = (q @ k.transpose(-2, -1) * D ** -0.5 + table_bias(q, self.table, n)).softmax(-1)
        y = (attn @ v).view(B, H, n, -1).transpose(1, 2).reshape(B, n, -1)
        return x + self.proj(y)


def test_batch_merged_with_heads_stays_dynamic():
    """Analysed at batch 1, compressed models run at batch 2 and 5 (no batch baked into shapes),
    the wrapped helper is traced into (qk keeps its groups), and ragged q/k vs v widths split."""
    m = build(BatchHeadsAttention)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == sorted([("head", H), ("qk", D), ("residual", C), ("v", D)]), str(an)
    assert ("block.table", 1) in only(an, "qk").params
    assert_exact(m, an)
    qk, v, head = only(an, "qk"), only(an, "v"), only(an, "head")
    plan = vitgraph.Plan.keep_all(an).keep(head.id, [0, 2, 3])
    assert not qk.per_head  # every head's q dims meet the one shared table
    plan.keep(qk.id, [0, 1, 2, 5, 6, 7]).keep(v.id, [[1, 4, 7], [0, 1, 2], [3, 5, 6], [2, 4, 5]])  # 6 qk vs 3 v dims
    slim, masked = vitgraph.compress(m, plan, an), vitgraph.mask(m, plan, an)
    assert slim.block.qkv.out_features == 3 * (6 + 6 + 3) and slim.block.table.shape == (2 * N - 1, 6)
    for b in (2, 5):
        x = inputs(b)
        with torch.no_grad():
            assert rel_err(slim(x), masked(x)) <= 1e-5


class FunctionalNormsMLP(nn.Module):
    """Hidden channels through per-channel ``F.group_norm``, ``torch.square`` and an
    ``addcmul`` affine (ResMLP style); ``one_group`` normalises them all together instead."""

    def __init__(self, one_group: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)
        self.gn_w, self.gn_b = nn.Parameter(torch.randn(24)), nn.Parameter(torch.randn(24))
        self.alpha, self.beta = nn.Parameter(torch.randn(24)), nn.Parameter(torch.randn(24))
        self.groups = 1 if one_group else 24

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).transpose(1, 2)  # [B, 24, N]
        h = F.group_norm(h, self.groups, self.gn_w, self.gn_b).transpose(1, 2)
        h = torch.addcmul(self.beta, self.alpha, torch.square(h))
        return x + self.fc2(h)


@pytest.mark.parametrize("one_group", [False, True])
def test_functional_group_norm_square_addcmul(one_group):
    m = build(FunctionalNormsMLP, one_group)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    # one group: statistics over every hidden channel, still the FFN's width, marked normalised
    assert kinds_and_sizes(an) == sorted([("ffn", 24), ("residual", C)]), str(an)
    ffn = only(an, "ffn")
    assert {("block.gn_w", 0), ("block.alpha", 0), ("block.beta", 0)} <= set(ffn.params)
    assert ffn.normalized == one_group
    plan = vitgraph.Plan.random(an, 0.5, seed=0)
    with torch.no_grad():
        assert vitgraph.compress(m, plan, an)(inputs()).shape == (B, NCLS)
    if not one_group:
        assert_exact(m, an)


from timm.layers import register_notrace_module  # noqa: E402


@register_notrace_module
class ShapeBranchingMLP(nn.Module):
    """A timm leaf whose forward branches on its input's static sizes and device (like
    EfficientViT's LiteMLA) and reads the batch size: inlined with those sizes fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)
        self.pos = nn.Parameter(torch.randn(N, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.fc1(x)
        if h.device.type != "meta" and n == N:  # control flow on device and token count
            h = F.gelu(h)
        y = self.fc2(h).reshape(b, n, c)
        y.add_(self.pos)  # in place, result unused: must survive dead-code elimination
        return x + y


def test_leaf_module_branching_on_static_sizes_is_inlined():
    m = build(ShapeBranchingMLP)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    assert ("block.pos", 1) in only(an, "residual").params
    with torch.no_grad():
        assert rel_err(an.graph_module(inputs()), m(inputs())) <= 1e-6
    assert_exact(m, an)  # analysed at batch 1, run at batch 2: the batch stays symbolic


@torch.fx.wrap
def padded_window_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, window: int) -> torch.Tensor:
    """A wrapped helper in torchvision's style: branches on an intermediate's size, builds a
    mask by in-place writes into ``new_zeros`` and compares it, then runs an MLP on ``x``."""
    pad = (window - x.shape[1] % window) % window
    y = F.pad(x, (0, 0, 0, pad))
    _, n_pad, _ = y.shape
    mask = y.new_zeros((n_pad,))
    if n_pad > window:  # control flow on the padded size
        mask[window:] = 1.0
    keep = (mask == 0).to(y.dtype) + (mask != 0).to(y.dtype)  # all ones, built from comparisons
    h = F.gelu(F.linear(y, w1)) * keep[None, :, None]
    return F.linear(h, w2)[:, : x.shape[1]]


class WrappedWindowMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(24, C) * 0.2), nn.Parameter(torch.randn(C, 24) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + padded_window_mlp(x, self.w1, self.w2, 4)


def test_wrapped_function_branching_on_intermediate_sizes_is_inlined():
    m = build(WrappedWindowMLP)
    an = vitgraph.analyze(m, inputs(1))
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    assert_exact(m, an)


@register_notrace_module
class CachingMLP(nn.Module):
    """A leaf that caches a tensor on itself (ConViT's ``rel_indices``), cast to a weight's dtype
    and expanded by the batch: traced into, and the module's cache left as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.cache is None or self.cache.shape[1] != n:
            self.cache = torch.linspace(0, 1, n).view(1, n, 1).to(dtype=self.fc1.weight.dtype)
        scale = self.cache.expand(b, -1, -1)
        return x + self.fc2(F.gelu(self.fc1(x))) * scale


def test_leaf_caching_state_is_inlined_and_left_untouched():
    m = build(CachingMLP)
    an = vitgraph.analyze(m, inputs(1))
    assert m.block.cache is None  # tracing put nothing on the user's module
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == [("ffn", 24), ("residual", C)], str(an)
    assert_exact(m, an)
