"""2:4 (Ampere) semi-structured sparsity for nn.Linear layers.

Pattern: in every group of 4 consecutive weights along the INPUT dimension
(``weight[:, 4j:4j+4]``) exactly 2 are kept and 2 are zero.

Eligibility rule (``shape_skip_reason``): ``in_features % 64 == 0``,
``out_features % 32 == 0`` and both at least ``min_features``.  That is the
strictest fp16/bf16 constraint of PyTorch's ``to_sparse_semi_structured``
(CUTLASS backend: rows multiple of 32, columns multiple of 64; cuSPARSELt
needs only 16/16), so every layer sparsified here can later be converted by
``to_semi_structured`` on either backend.

Entry points:
  * ``sparsify_24``          -- new module with 2:4-masked Linear weights + report
  * ``permutation_gain``     -- input-channel permutation search for one weight
  * ``Mask24Enforcer`` / ``enforce_24`` / ``reapply_masks`` -- keep the pattern while fine-tuning
  * ``accumulate_saliency``  -- Fisher-style ``(w * grad)^2`` scores for ``method="hessian"``
  * ``to_semi_structured``   -- swap weights for CUDA semi-structured tensors when possible
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vitgraph.analysis.ops import OPS
from vitgraph.capture.op_targets import module_entry
from vitgraph.deploy.onnx24 import shape_skip_reason
from vitgraph.errors import ArgumentError

__all__ = [
    "MASK_BUFFER",
    "SEMI_STRUCTURED_UNAVAILABLE",
    "Sparse24Report",
    "SemiStructuredReport",
    "Mask24Enforcer",
    "shape_skip_reason",
    "mask_24",
    "satisfies_24",
    "permutation_gain",
    "find_permutable_pairs",
    "permute_for_24",
    "accumulate_saliency",
    "sparsify_24",
    "enforce_24",
    "reapply_masks",
    "restore_masks",
    "to_semi_structured",
]

MASK_BUFFER = "weight_mask24"
SEMI_STRUCTURED_UNAVAILABLE = (
    "2:4 pattern applied as dense weights; semi-structured kernels need CUDA compute capability >= 8.0"
)
_METHODS = ("magnitude", "hessian")
_HESSIAN_HELP = (
    'method="hessian" needs saliency={layer_name: tensor of weight shape}; obtain it with '
    "vitgraph.passes.sparsity24.accumulate_saliency(model, loss_fn, batches), which accumulates "
    "(weight * grad)^2 (empirical Fisher, NViT style) over a few calibration batches"
)



@dataclass(frozen=True)
class Sparse24Report:
    """Outcome of ``sparsify_24``."""

    method: str
    sparsified: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (layer name, reason)
    kept_magnitude_fraction: float  # sum|w * mask| / sum|w| over sparsified layers
    permuted: tuple[tuple[str, str], ...] = ()  # (producer, consumer) pairs that were permuted

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"2:4 sparsity ({self.method}): {len(self.sparsified)} layers sparsified, "
                 f"kept |w| fraction {self.kept_magnitude_fraction:.4f}"]
        lines += [f"  permuted {a} -> {b}" for a, b in self.permuted]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class SemiStructuredReport:
    """Outcome of ``to_semi_structured``."""

    applied: bool
    converted: tuple[str, ...]
    message: str


# --------------------------------------------------------------------------- masks


def _groups(t: torch.Tensor) -> torch.Tensor:
    """View an (out, in) tensor as (out, in/4, 4) groups along the input dimension."""
    if t.dim() != 2 or t.shape[1] % 4:
        raise ArgumentError(f"expected a 2-D tensor with a multiple of 4 columns, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1] // 4, 4)


def mask_24(score: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 highest scores in every group of 4 along dim 1."""
    groups = _groups(score.detach())
    top2 = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return mask.reshape(score.shape)


def satisfies_24(weight: torch.Tensor) -> bool:
    """True iff every group of 4 along dim 1 has at most 2 non-zeros."""
    return bool(((_groups(weight.detach()) != 0).sum(-1) <= 2).all())


def _kept_over_rows(score: torch.Tensor) -> torch.Tensor:
    """Top-2 sum of each trailing 4-group, summed over dim 0 (rows); (out, ..., 4) -> (...)."""
    return score.topk(2, dim=-1).values.sum(-1).sum(0)


# --------------------------------------------------------------------------- permutation search


_REST = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


def _top2_of_rest(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (..., 4) groups: largest and second largest of the 3 values other than index i."""
    rest = v[..., _REST]  # (..., 4, 3)
    first, last = rest.amax(-1), rest.amin(-1)
    return first, rest.sum(-1) - first - last  # the middle of 3 = sum - max - min


def _best_swaps(v_a: torch.Tensor, v_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best single-column swap per group pair: (gain, flat index 4*i + j) for A[i] <-> B[j].

    v_a, v_b: (out, P, 4) scores of paired groups.  After replacing A[i] by x = B[j], the
    top-2 sum of A's row is r1 + max(r2, x), with r1 >= r2 the top two of A's other 3 values.
    """
    r1a, r2a = _top2_of_rest(v_a)
    r1b, r2b = _top2_of_rest(v_b)
    new_a = r1a[..., :, None] + torch.maximum(r2a[..., :, None], v_b[..., None, :])  # (out, P, 4, 4)
    new_b = r1b[..., None, :] + torch.maximum(r2b[..., None, :], v_a[..., :, None])
    after = (new_a + new_b).sum(0).flatten(1)  # (P, 16)
    before = _kept_over_rows(v_a) + _kept_over_rows(v_b)  # (P,)
    gain, best = (after - before[:, None]).max(dim=1)
    # Relative threshold so float round-off never counts as an improvement.
    return torch.where(gain > 1e-5 * before.clamp_min(1e-12), gain, torch.zeros_like(gain)), best


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _search_permutation(score: torch.Tensor, rounds: int, seed: int) -> torch.Tensor:
    """Greedy swap search for an input-column permutation raising the 2:4-kept score."""
    # A round evaluates 2 * numel candidate row-swaps; below ~2M of them intra-op thread
    # start-up dominates (and degrades badly on a loaded machine), so run single-threaded.
    small = score.numel() < (1 << 20)
    with _threads(1) if small else contextlib.nullcontext():
        return _swap_search(score.detach().abs().float(), rounds, seed)


def _swap_search(score: torch.Tensor, rounds: int, seed: int) -> torch.Tensor:
    """Random-matching swap search on a non-negative (out, in) score."""
    n_groups = score.shape[1] // 4
    perm = torch.arange(score.shape[1])
    if n_groups < 2:
        return perm
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, (1 << 22) // (score.shape[0] * 16))  # bound the (out, P, 4, 4) temporaries
    stale = 0
    for _ in range(rounds):
        # Random perfect matching of groups: disjoint pairs can all be swapped at once,
        # and each accepted swap strictly increases the kept score (monotone search).
        order = torch.randperm(n_groups, generator=gen)[: n_groups // 2 * 2].reshape(-1, 2)
        cols = perm.reshape(n_groups, 4).clone()
        grouped = score[:, cols]  # (out, G, 4)
        results = [_best_swaps(grouped[:, o[:, 0]], grouped[:, o[:, 1]]) for o in order.split(chunk)]
        gain, best = torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
        idx = (gain > 0).nonzero().squeeze(1)
        stale = stale + 1 if idx.numel() == 0 else 0
        if stale >= 3:
            break
        ga, gb, i, j = order[idx, 0], order[idx, 1], best[idx] // 4, best[idx] % 4
        col_a, col_b = cols[ga, i].clone(), cols[gb, j].clone()
        cols[ga, i], cols[gb, j] = col_b, col_a
        perm = cols.reshape(-1)
    return perm


def _kept_score(score: torch.Tensor) -> float:
    """Total |score| retained by the best 2:4 mask of ``score``."""
    return float(_kept_over_rows(_groups(score.detach().abs().float())).sum())


def permutation_gain(weight: torch.Tensor, *, score: torch.Tensor | None = None, rounds: int = 100,
                     seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Search an input-column permutation; return (perm, kept_before, kept_after).

    ``kept`` is the sum of |w| (or of ``score``) retained by the best 2:4 mask;
    ``weight[:, perm]`` retains ``kept_after >= kept_before``.
    """
    score = weight if score is None else score
    if score.shape != weight.shape:
        raise ArgumentError(f"score shape {tuple(score.shape)} != weight shape {tuple(weight.shape)}")
    _groups(score)  # validates 2-D with in % 4 == 0
    perm = _search_permutation(score, rounds, seed)
    return perm, _kept_score(score), _kept_score(score[:, perm])


# --------------------------------------------------------------------------- producer/consumer pairs


def _is_elementwise(node: torch.fx.Node, modules: dict[str, nn.Module],
                    extra: tuple[type[nn.Module], ...]) -> bool:
    """True if an fx node applies a channel-wise function to one tensor: an op declared
    ``pointwise`` in the op registry (so permuting channels before it equals permuting after
    it), a LayerNorm (its affine parameters are permuted too), or one of ``extra``."""
    if len(node.all_input_nodes) != 1:
        return False
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, (nn.LayerNorm, *extra)):
            return True
        spec = module_entry(OPS, mod)
    elif node.op in ("call_function", "call_method"):
        spec = OPS.get(node.target)
    else:
        return False
    return bool(spec is not None and spec.pointwise)


def _chain_to_producer(consumer: torch.fx.Node, modules: dict[str, nn.Module],
                       extra: tuple[type[nn.Module], ...]) -> tuple[str, list[str]] | None:
    """Walk back from a Linear call through single-use elementwise nodes to a Linear producer."""
    if len(consumer.args) != 1 or consumer.kwargs:
        return None
    node, between = consumer.args[0], []
    while isinstance(node, torch.fx.Node) and len(node.users) == 1:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            return node.target, between
        if not _is_elementwise(node, modules, extra):
            return None
        if node.op == "call_module":
            between.append(node.target)
        node = node.all_input_nodes[0]
    return None


def _candidate_parents(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules with two direct Linear children whose shapes could chain (cheap pre-filter)."""
    for name, parent in module.named_modules():
        linears = [c for c in parent.children() if isinstance(c, nn.Linear)]
        outs = {lin.out_features for lin in linears}
        if any(lin.in_features in outs for lin in linears):
            yield name, parent


def _layernorm_ok(norm: nn.LayerNorm, width: int) -> bool:
    """A LayerNorm commutes with channel permutation iff it normalises exactly the permuted dim."""
    return tuple(norm.normalized_shape) == (width,)


def find_permutable_pairs(module: nn.Module, *, extra_elementwise: tuple[type[nn.Module], ...] = ()
                          ) -> list[tuple[str, str, tuple[str, ...]]]:
    """Find (producer, consumer, between) Linear pairs whose hidden channels can be permuted.

    The producer's output must flow only into the consumer, through single-input
    elementwise modules/functions (activation, dropout, Identity, last-dim LayerNorm),
    inside one parent module; verified on a torch.fx trace of that parent.
    """
    pairs = []
    for parent_name, parent in _candidate_parents(module):
        try:
            graph = torch.fx.symbolic_trace(parent).graph
        except Exception:  # untraceable parent: producer is ambiguous, leave it alone
            continue
        modules = dict(parent.named_modules())
        calls = [n.target for n in graph.nodes if n.op == "call_module"]
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], nn.Linear):
                continue
            found = _chain_to_producer(node, modules, extra_elementwise)
            if found is None:
                continue
            producer, between = found
            width = modules[producer].out_features
            if (calls.count(producer) != 1 or calls.count(node.target) != 1
                    or modules[node.target].in_features != width
                    or any(isinstance(modules[b], nn.LayerNorm) and not _layernorm_ok(modules[b], width)
                           for b in between)):
                continue
            prefix = f"{parent_name}." if parent_name else ""
            pairs.append((prefix + producer, prefix + node.target, tuple(prefix + b for b in between)))
    return pairs


def _tied_params(module: nn.Module) -> set[int]:
    """ids of parameters registered in more than one place."""
    seen: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


@torch.no_grad()
def _apply_channel_permutation(producer: nn.Linear, consumer: nn.Linear, norms: list[nn.LayerNorm],
                               perm: torch.Tensor) -> None:
    """Permute producer output rows (+bias), norm affine params and consumer input columns."""
    # consumer(f(P x)) with P the row permutation equals consumer[:, perm](f(x)[perm]) for
    # elementwise f, so the composed function is unchanged.
    producer.weight.copy_(producer.weight[perm])
    if producer.bias is not None:
        producer.bias.copy_(producer.bias[perm])
    for norm in norms:
        if norm.weight is not None:
            norm.weight.copy_(norm.weight[perm])
        if norm.bias is not None:
            norm.bias.copy_(norm.bias[perm])
    consumer.weight.copy_(consumer.weight[:, perm])
    # Keep any previously stored 2:4 masks aligned with the moved weights.
    for layer, index in ((producer, (perm,)), (consumer, (slice(None), perm))):
        mask = getattr(layer, MASK_BUFFER, None)
        if mask is not None:
            _set_mask(layer, mask[index])


# --------------------------------------------------------------------------- main pass


def accumulate_saliency(module: nn.Module, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                        batches: Iterable[object]) -> dict[str, torch.Tensor]:
    """Accumulate (w * dL/dw)^2 per nn.Linear (keyed by module name) over calibration batches."""
    # Second-order Taylor / empirical-Fisher estimate of the loss increase from zeroing w:
    # dL ~ 0.5 * F * w^2 with F ~ grad^2, so (w * grad)^2 ranks weights by importance.
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    scores = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in linears.items()}
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            module.zero_grad(set_to_none=True)
            loss_fn(module, batch).backward()
            for name, m in linears.items():
                if m.weight.grad is not None:
                    scores[name] += (m.weight.detach() * m.weight.grad).float() ** 2
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return scores


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True if name matches any fnmatch pattern."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _eligible_linears(module: nn.Module, exclude: tuple[str, ...], min_features: int
                      ) -> tuple[dict[str, nn.Linear], list[tuple[str, str]]]:
    """Split nn.Linear layers into eligible ones and (name, reason) skips."""
    eligible, skipped = {}, []
    tied = _tied_params(module)
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        reason = shape_skip_reason(m.out_features, m.in_features, min_features=min_features)
        if _matches(name, exclude):
            reason = "excluded by pattern"
        elif reason is None and id(m.weight) in tied:
            reason = "weight is shared with another module"
        if reason is None:
            eligible[name] = m
        else:
            skipped.append((name, reason))
    return eligible, skipped


def _saliency_for(name: str, weight: torch.Tensor, saliency: dict[str, torch.Tensor]) -> torch.Tensor:
    """Look up a layer's saliency by module or parameter name, checking its shape."""
    for key in (name, f"{name}.weight"):
        if key in saliency:
            score = saliency[key]
            if tuple(score.shape) != tuple(weight.shape):
                raise ArgumentError(f"saliency[{key!r}] has shape {tuple(score.shape)}, "
                                 f"expected weight shape {tuple(weight.shape)}")
            return score.detach().to(device=weight.device, dtype=torch.float32)
    raise ArgumentError(f"saliency has no entry for eligible layer {name!r}; "
                     f"add it or exclude the layer. {_HESSIAN_HELP}")


def _permute_pairs(model: nn.Module, scores: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Permute every legal (producer, consumer) pair whose consumer has a score; update scores."""
    modules = dict(model.named_modules())
    tied = _tied_params(model)
    done = []
    for producer, consumer, between in find_permutable_pairs(model):
        if consumer not in scores or id(modules[producer].weight) in tied:
            continue
        perm, before, after = permutation_gain(modules[consumer].weight, score=scores[consumer])
        if after <= before:
            continue
        norms = [modules[b] for b in between if isinstance(modules[b], nn.LayerNorm)]
        _apply_channel_permutation(modules[producer], modules[consumer], norms, perm)
        scores[consumer] = scores[consumer][:, perm]
        if producer in scores:
            scores[producer] = scores[producer][perm]
        done.append((producer, consumer))
    return done


def permute_for_24(module: nn.Module, *, min_features: int = 64, exclude: Iterable[str] = ()
                   ) -> tuple[nn.Module, tuple[tuple[str, str], ...]]:
    """Return (copy, permuted pairs): hidden channels reordered to raise 2:4-kept |w|, same function.

    Only pairs found by ``find_permutable_pairs`` whose consumer is eligible are touched.
    """
    model = copy.deepcopy(module)
    eligible, _ = _eligible_linears(model, _patterns(exclude), min_features)
    scores = {name: m.weight.detach().abs().float() for name, m in eligible.items()}
    return model, tuple(_permute_pairs(model, scores))


def _patterns(exclude: Iterable[str]) -> tuple[str, ...]:
    """Normalise exclude patterns (a single string is one pattern)."""
    return (exclude,) if isinstance(exclude, str) else tuple(exclude)


def sparsify_24(module: nn.Module, method: str = "magnitude", *, permute: bool = False,
                saliency: dict[str, torch.Tensor] | None = None, min_features: int = 64,
                exclude: Iterable[str] = ()) -> nn.Module:
    """Return a deep copy of ``module`` with 2:4-masked eligible nn.Linear weights.

    The copy carries ``vitgraph_24_report`` (``Sparse24Report``) and a non-persistent
    boolean buffer ``weight_mask24`` on every sparsified Linear.
    """
    if method not in _METHODS:
        raise ArgumentError(f"unknown method {method!r}; expected one of {_METHODS}")
    if method == "hessian" and saliency is None:
        raise ArgumentError(_HESSIAN_HELP)
    model = copy.deepcopy(module)
    eligible, skipped = _eligible_linears(model, _patterns(exclude), min_features)
    scores = {name: (m.weight.detach().abs().float() if method == "magnitude"
                     else _saliency_for(name, m.weight, saliency))
              for name, m in eligible.items()}
    permuted = _permute_pairs(model, scores) if permute else []
    kept = total = 0.0
    with torch.no_grad():
        for name, m in eligible.items():
            mask = mask_24(scores[name])
            kept += float((m.weight.abs() * mask).sum())
            total += float(m.weight.abs().sum())
            m.weight.mul_(mask)
            _set_mask(m, mask)
    model.vitgraph_24_report = Sparse24Report(
        method=method, sparsified=tuple(eligible), skipped=tuple(skipped),
        kept_magnitude_fraction=kept / total if total > 0 else 1.0, permuted=tuple(permuted))
    return model


def _set_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Store (or overwrite) the 2:4 mask buffer on a Linear."""
    if MASK_BUFFER in linear._buffers:
        linear._buffers[MASK_BUFFER] = mask
    else:
        # Non-persistent: state_dict stays loadable into the unpruned architecture.
        linear.register_buffer(MASK_BUFFER, mask, persistent=False)


# --------------------------------------------------------------------------- enforcement


def _masked_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """nn.Linear layers carrying a ``weight_mask24`` buffer."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and getattr(m, MASK_BUFFER, None) is not None}


@torch.no_grad()
def restore_masks(module: nn.Module, names: Iterable[str]) -> int:
    """Store the 2:4 mask buffer of every named Linear again, read off its (already 2:4) weight.

    The buffers are not part of the state dict, so a saved 2:4 model reloads without them; the
    mask is the 2 largest magnitudes of every group of 4 (the nonzeros, and any zeros needed to
    make 2).  Returns the number of layers; a weight that is not 2:4 raises ``ValueError``.
    """
    layers, names = dict(module.named_modules()), list(names)
    for name in names:
        linear = layers.get(name)
        if not isinstance(linear, nn.Linear):
            raise ArgumentError(f"{name!r} is not a Linear layer of the model")
        if not satisfies_24(linear.weight):
            raise ArgumentError(f"the weight of {name!r} is not 2:4 sparse")
        _set_mask(linear, mask_24(linear.weight.detach().abs()))
    return len(names)


def reapply_masks(module: nn.Module) -> int:
    """Zero pruned weights of every masked Linear in place; return the number of layers."""
    layers = _masked_linears(module)
    with torch.no_grad():
        for m in layers.values():
            m.weight.mul_(getattr(m, MASK_BUFFER).to(m.weight.dtype))
    return len(layers)


class Mask24Enforcer:
    """Keeps the stored 2:4 masks in force while a model is fine-tuned.

    Three mechanisms: gradients of pruned weights are zeroed (so momentum/Adam states stay
    zero there), masks are re-applied before every forward, and optionally after every
    ``optimizer.step()``.  Use ``remove()`` (or a ``with`` block) to detach the hooks.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Register the hooks on every Linear with a ``weight_mask24`` buffer."""
        self.layers = _masked_linears(module)
        if not self.layers:
            raise ArgumentError(f"no nn.Linear with a {MASK_BUFFER!r} buffer; run sparsify_24 first")
        self.module = module
        self._handles: list = []
        for m in self.layers.values():
            self._handles.append(m.register_forward_pre_hook(self._pre_forward))
            self._handles.append(m.weight.register_hook(self._grad_masker(m)))
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    @staticmethod
    def _pre_forward(linear: nn.Module, _args: tuple) -> None:
        """Re-apply the mask before the layer runs."""
        with torch.no_grad():
            linear.weight.mul_(getattr(linear, MASK_BUFFER).to(linear.weight.dtype))

    @staticmethod
    def _grad_masker(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        """Gradient hook zeroing gradients of pruned weights."""
        return lambda grad: grad * getattr(linear, MASK_BUFFER).to(grad.dtype)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply masks after every ``optimizer.step()``."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: reapply_masks(self.module)))

    def remove(self) -> None:
        """Detach all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Mask24Enforcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enforce_24(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Mask24Enforcer:
    """Install a ``Mask24Enforcer`` on ``module`` (and ``optimizer`` if given)."""
    return Mask24Enforcer(module, optimizer)


# --------------------------------------------------------------------------- CUDA kernels


def _semi_structured_support(module: nn.Module) -> str | None:
    """Why semi-structured kernels cannot be used for this module, or None if they can."""
    devices = {p.device for p in module.parameters()}
    if not torch.cuda.is_available() or any(d.type != "cuda" for d in devices):
        return SEMI_STRUCTURED_UNAVAILABLE + " (module is not on CUDA)"
    for device in devices:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return SEMI_STRUCTURED_UNAVAILABLE + f" (device {device} has {major}.{minor})"
    return None


def to_semi_structured(module: nn.Module) -> tuple[nn.Module, SemiStructuredReport]:
    """Return (module, report); on CUDA sm>=8.0 a fp16 copy with semi-structured 2:4 weights.

    Without suitable hardware the input module is returned unchanged (dense 2:4 weights)
    with ``report.applied == False`` and ``SEMI_STRUCTURED_UNAVAILABLE`` in ``report.message``.
    """
    reason = _semi_structured_support(module)
    if reason is not None:
        return module, SemiStructuredReport(applied=False, converted=(), message=reason)
    from torch.sparse import to_sparse_semi_structured

    model = copy.deepcopy(module).half()
    converted = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and shape_skip_reason(m.out_features, m.in_features, min_features=0) is None
                and satisfies_24(m.weight)):
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
            converted.append(name)
    message = f"converted {len(converted)} Linear weights to semi-structured 2:4 (fp16)"
    return model, SemiStructuredReport(applied=True, converted=tuple(converted), message=message)
