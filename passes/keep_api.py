"""Keep the model's own API on its compressed module.

A compressed model is a GraphModule of ``forward``.  This pass gives it the rest of what the
input model offers, found by a rule rather than a list of names:

* **methods**: every public method of the model's class (a class in its MRO that defines
  ``forward``, so library mixins are left out) whose first parameter is a tensor (annotated so,
  or named as ``forward``'s) and whose other parameters have defaults: timm's ``forward_features``, ``forward_head``,
  ``forward_intermediates``, HF's ``get_image_features``.  Each is captured as its own graph
  (on the forward's inputs, or failing that on another method's output, as ``forward_head`` reads
  ``forward_features``), analysed with outputs (and, when chained, inputs) prunable, given the
  forward plan's kept channels through the parameters both graphs share, compressed, checked
  against the masked model, and bound to the compressed module so that it reads the compressed
  parameters at call time;
* **attributes**: the model's public plain attributes (``num_classes``, ``pretrained_cfg``, an HF
  ``config``), copied; integers among them (and in an HF config) that equal a width the plan
  changed are listed in ``vitgraph_widths`` (``{name: "residual: 192 -> 160"}``), not rewritten;
* ``reset_classifier(n)`` where the model has one: the linear layer that writes the output is
  replaced by a fresh one of ``n`` outputs (an identity for 0), which :func:`vitgraph.save`
  records so that :func:`vitgraph.load` repeats it.

A method that cannot be captured, or whose compressed graph does not fit the compressed
parameters or differs from the masked model, is not offered (logged at debug level).
"""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from vitgraph.errors import ArgumentError, VitgraphError

log = logging.getLogger("vitgraph.api")

BOUND_MARK = "_vitgraph_method"  # set on the functions bound here, so a result pruned again keeps them
CLASSIFIER_ATTR = "_vitgraph_classifier"  # {"module": name, "num_classes": n} after reset_classifier
EXACT_TOL = 1e-4  # max relative output error of a method against the masked model (as verify_compressed)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_PLAIN = (int, float, str, bool, type(None))
_KIND_WIDTHS = ("residual", "ffn")  # widths an attribute is read as (a head count of 3 is also in_chans)


def keep_api(slim: fx.GraphModule, model: nn.Module, analysis: Any, plan: Any,
             inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Give ``slim`` (``compress(model, plan)``) ``model``'s public tensor methods and attributes;
    ``inputs`` are tensors of the plan's input shapes and dtypes (their values are not used)."""
    widths = _changed_widths(analysis, plan)
    _copy_attributes(slim, model, widths)
    api = _bound_methods(slim, model, analysis, plan, inputs)
    if callable(getattr(model, "reset_classifier", None)):
        api["reset_classifier"] = reset_classifier
    _bind(type(slim), api)
    return slim


def _bind(cls: type, api: dict[str, Any]) -> None:
    """Put ``api`` on a GraphModule's own class, and keep it there through ``copy.deepcopy``
    (which makes a new class per copy)."""
    for name, fn in api.items():
        setattr(cls, name, fn)

    def __deepcopy__(self: fx.GraphModule, memo: dict) -> fx.GraphModule:
        res = fx.GraphModule.__deepcopy__(self, memo)
        _bind(type(res), api)
        return res

    cls.__deepcopy__ = __deepcopy__


# -- attributes ---------------------------------------------------------------------------------
def _plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return _is_config(v) or _is_dataclass_cfg(v)


def _is_config(v: Any) -> bool:
    return any(c.__name__.lower() == "pretrainedconfig" for c in type(v).__mro__)  # (5.x: PreTrainedConfig)


def _is_dataclass_cfg(v: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _changed_widths(analysis: Any, plan: Any) -> dict[int, str]:
    """Dense width -> "kind: dense -> kept" of every width the plan changes (one per dense size)."""
    out: dict[int, str] = {}
    kept_sizes: dict[tuple[str, int], set[int]] = {}
    for g in analysis.groups:
        keep = plan.kept.get(g.id)
        if keep is None or g.kind not in _KIND_WIDTHS:
            continue
        n = len(keep[0]) if keep and isinstance(keep[0], list) else len(keep)
        if n != g.size:
            kept_sizes.setdefault((g.kind, g.size), set()).add(n)
    for (kind, size), kept in kept_sizes.items():
        shown = str(kept.pop()) if len(kept) == 1 else "per layer " + "/".join(map(str, sorted(kept)))
        out.setdefault(size, f"{kind}: {size} -> {shown}")
    return out


def _copy_attributes(slim: nn.Module, model: nn.Module, widths: dict[int, str]) -> None:
    stale: dict[str, str] = {}
    for name, v in vars(model).items():
        if name.startswith("_") or name == "training" or not _plain(v):
            continue
        if hasattr(slim, name) and getattr(slim, name) is not v:  # (a graph module may share the model's config)
            continue
        v = copy.deepcopy(v)
        if _is_config(v):
            marks = {k: widths[x] for k, x in v.to_dict().items()
                     if type(x) is int and x in widths}
            v.vitgraph_widths = marks
            stale.update({f"{name}.{k}": m for k, m in marks.items()})
        elif type(v) is int and v in widths:
            stale[name] = widths[v]
        setattr(slim, name, v)
    slim.vitgraph_widths = stale


# -- methods ------------------------------------------------------------------------------------
def public_tensor_methods(model: nn.Module) -> list[str]:
    """Names of ``model``'s public methods that take one tensor (other parameters defaulted)."""
    names: list[str] = []
    taken = set(dir(fx.GraphModule))
    inputs = _first_param_name(type(model).forward)
    for cls in type(model).__mro__:
        if cls is nn.Module or "forward" not in vars(cls):
            continue
        for name, fn in vars(cls).items():
            if name.startswith("_") or name in taken or name in names or not inspect.isfunction(fn):
                continue
            if getattr(fn, BOUND_MARK, False) or _takes_one_tensor(fn, inputs):
                names.append(name)
    return names


def _first_param_name(fn: Any) -> Optional[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return params[0].name if params else None


def _takes_one_tensor(fn: Any, input_name: Optional[str]) -> bool:
    """The first parameter is a tensor (annotated so, or named as ``forward``'s input, for
    unannotated code) and every other one has a default."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    if not params or params[0].kind not in _POSITIONAL:
        return False
    if "Tensor" not in str(params[0].annotation) and params[0].name != input_name:
        return False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return all(p.default is not inspect.Parameter.empty or p.kind in variadic for p in params[1:])


def method_module(model: nn.Module, name: str) -> nn.Module:
    """A shallow copy of ``model`` (same submodules and parameters) whose ``forward`` is ``name``."""
    obj = copy.copy(model)
    cls = type(model)
    fn = getattr(cls, name)
    fn = getattr(fn, BOUND_MARK, fn)  # a method bound here: its graph's function (tensor inputs only)
    obj.__class__ = type(f"{cls.__name__}_{name}", (cls,), {"forward": fn, "__module__": cls.__module__})
    return obj


def _bound_methods(slim: fx.GraphModule, model: nn.Module, analysis: Any, plan: Any,
                   inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    names = public_tensor_methods(model)
    if not names:
        return {}
    gen = torch.Generator().manual_seed(0)  # (the user's random state is left alone)
    base = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else t
                 for t in inputs)
    found: dict[str, Any] = {}
    tries = [(base, False)]  # the forward's inputs, then the tensor outputs of methods that worked
    tried = dict.fromkeys(names, 0)  # how many of ``tries`` each method has had
    while any(n not in found and tried[n] < len(tries) for n in names):
        for name in names:
            while name not in found and tried[name] < len(tries):
                args, chained = tries[tried[name]]
                tried[name] += 1
                fn, out = _try_method(slim, model, analysis, plan, name, args, chained)
                if fn is not None:
                    found[name] = fn
                    if isinstance(out, torch.Tensor):
                        tries.append(((out,), True))
    return found


def _try_method(slim, model, analysis, plan, name, inputs, chained) -> tuple[Optional[Any], Any]:
    from vitgraph.analysis.engine import analyze

    mod = method_module(model, name)
    try:
        with torch.no_grad():
            out = mod(*inputs)
        an = analyze(mod, inputs, prune_outputs=True, channel_inputs=chained)
        sub = _transfer(analysis, plan, an)
        fn = _compress_method(slim, model, mod, an, sub, inputs)
    except (VitgraphError, RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            AssertionError) as e:
        log.debug("method %s not kept on the compressed model: %s: %s", name, type(e).__name__, e)
        return None, None
    return fn, out


def _transfer(analysis: Any, plan: Any, an: Any) -> Any:
    """The forward plan's kept channels, on the groups of a method's analysis ``an`` (matched by
    the parameter dims the groups share); groups of the method alone keep everything."""
    from vitgraph.planning.plan import Plan

    owners: dict[tuple[str, int], list[Any]] = {}
    for fg in analysis.groups:
        for pd in fg.params:
            owners.setdefault(pd, []).append(fg)
    kept: dict[str, Any] = {}
    for g in an.groups:
        # a parameter dim can lie in nested groups (a fused qkv row is in a head, a qk and a v
        # group): the match is the one of the same size, and of the same kind where sizes tie
        cands = {fg.id: fg for pd in g.params for fg in owners.get(pd, ()) if fg.size == g.size}
        if len(cands) > 1:
            cands = {i: fg for i, fg in cands.items() if fg.kind == g.kind} or cands
        if len(cands) > 1:  # (heads before and after a talking-heads mix; a stream between two stages)
            share = {i: len(set(fg.params) & set(g.params)) for i in cands}
            best = max(share.values())
            cands = {i: fg for i, fg in cands.items() if share[i] == best}
        if len(cands) > 1 and g.id in cands:  # ids name where a group lives: the same in both graphs
            cands = {g.id: cands[g.id]}
        if len(cands) > 1:
            raise VitgraphError(f"group {g.id} matches the forward's groups {sorted(cands)}")
        if not cands:
            if any(pd in owners for pd in g.params):
                raise VitgraphError(f"group {g.id} ({g.size}) couples channels the forward groups otherwise")
            continue
        (fid, _), = cands.items()
        if fid in plan.kept:
            kept[g.id] = plan.kept[fid]
    return Plan(an.fingerprint, [list(s) for s in an.input_shapes], list(an.input_dtypes), kept, an, True)


def _compress_method(slim: fx.GraphModule, model: nn.Module, mod: nn.Module, an: Any, sub: Any,
                     inputs: tuple) -> Any:
    """The compressed method as a function of the compressed module, checked against the masked
    method (on the plan's exact groups) and against the compressed module's tensors."""
    from vitgraph.passes.exactness import exact_plan, output_error
    from vitgraph.passes.mask import apply_mask
    from vitgraph.passes.slim import slim as slim_pass

    own = slim_pass(an, sub.selection(an))
    part = exact_plan(an, sub)
    if part.kept:
        cand = own if part.kept == sub.kept else slim_pass(an, part.selection(an))
        err = output_error(cand, apply_mask(mod, an, part.selection(an)), inputs)
        if err > EXACT_TOL:
            raise VitgraphError(f"differs from the masked model (relative error {err:.2g})")
    state = dict(slim.named_parameters()) | dict(slim.named_buffers())
    mine = dict(own.named_parameters()) | dict(own.named_buffers())
    user = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for k, t in mine.items():
        # the same code over equal tensors: the bound function computes what the checked graph does
        if k in user and (k not in state or state[k].shape != t.shape or not torch.equal(state[k], t)):
            raise VitgraphError(f"{k} is {tuple(t.shape)}, the compressed model's is "
                                f"{tuple(state[k].shape) if k in state else 'absent'} or holds other values")
    _move_constants(own, slim, user, type(mod).forward.__name__)
    return _with_defaults(type(own).forward, type(mod).forward)


def _move_constants(own: fx.GraphModule, slim: fx.GraphModule, user: set[str], method: str) -> None:
    """Give the constants the method's trace made (``_tensor_constant0``: not the model's state)
    to ``slim`` under names of their own, as buffers that ``state_dict`` leaves out (they are made
    again when the model is compressed again, as ``vitgraph.load`` does)."""
    for node in own.graph.nodes:
        if node.op != "get_attr" or node.target in user:
            continue
        value = own.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else own
        value = getattr(value, node.target.rpartition(".")[2])
        name = f"_vitgraph_{method}_{node.target.replace('.', '_')}"
        if not isinstance(value, torch.Tensor):
            raise VitgraphError(f"reads {node.target}, a {type(value).__name__} of its own trace")
        if name not in dict(slim.named_buffers()):
            slim.register_buffer(name, value.detach().clone(), persistent=False)
        node.target = name
    own.recompile()


def _with_defaults(fn: Any, original: Any) -> Any:
    """``fn`` (the captured graph of ``original`` at its default options) as a method with
    ``original``'s signature that refuses options other than the defaults it was captured with."""
    params = list(inspect.signature(original).parameters.values())[2:]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    names = [p.name for p in params if p.kind in _POSITIONAL]

    def method(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
        given = dict(zip(names, args)) | kwargs
        for k, v in given.items():
            if k not in defaults:
                raise ArgumentError(f"{original.__name__}() got an unexpected argument {k!r}")
            if not _equal(v, defaults[k]):
                raise ArgumentError(
                    f"{original.__name__} of a compressed model runs with its captured options "
                    f"({', '.join(f'{n}={d!r}' for n, d in defaults.items())}); got {k}={v!r}")
        return fn(self, x)

    method.__name__ = method.__qualname__ = original.__name__
    method.__doc__ = original.__doc__
    setattr(method, BOUND_MARK, getattr(original, BOUND_MARK, fn))  # the graph's function, to capture again
    return method


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else False
    except (TypeError, ValueError, RuntimeError):
        return False


# -- reset_classifier ---------------------------------------------------------------------------
def classifier_name(gm: fx.GraphModule) -> str:
    """The linear layer whose output is the model's (first) output."""
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    seen, todo = set(), list(out.all_input_nodes[:1])
    while todo:
        node = todo.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.Linear, nn.Identity)):
            return node.target
        if node.op in ("call_function", "call_method") and node.all_input_nodes:
            todo.append(node.all_input_nodes[0])
    raise VitgraphError("no linear layer writes this model's output: it has no classifier to reset")


def reset_classifier(self: fx.GraphModule, num_classes: int, global_pool: Any = None) -> None:
    """Replace the classifier by a new linear layer of ``num_classes`` outputs (0: no classifier)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ArgumentError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if global_pool is not None:
        raise ArgumentError("a compressed model keeps its pooling: reset_classifier(n) takes no global_pool")
    rec = getattr(self, CLASSIFIER_ATTR, None)
    name = rec["module"] if rec else classifier_name(self)
    old = self.get_submodule(name)
    width = rec["in_features"] if rec else old.in_features
    new = nn.Linear(width, num_classes) if num_classes else nn.Identity()
    if isinstance(old, nn.Linear):
        new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent, _, leaf = name.rpartition(".")
    setattr(self.get_submodule(parent) if parent else self, leaf, new)
    setattr(self, CLASSIFIER_ATTR, {"module": name, "num_classes": num_classes, "in_features": width})
    if "num_classes" in vars(self):
        self.num_classes = num_classes
