"""vitgraph: structured pruning of Vision Transformers as torch.fx passes.

    an = vitgraph.analyze(model, example_inputs)
    plan = vitgraph.Plan.from_scores(an, scores=None, ratio=0.5)
    slim = vitgraph.compress(model, plan)
"""
from vitgraph.analysis.engine import Analysis, ChannelGroup, FrozenChannels, analyze
from vitgraph.api import compress, mask
from vitgraph.artifact import load, save
from vitgraph.deploy.export import export_onnx
from vitgraph.errors import (AnalysisError, ArgumentError, ArgumentTypeError, CompressionMismatchError, DataError, ExportError,
                             PlanError, ScoreError, TraceError, UnknownGroupError, VitgraphError)
from vitgraph.planning.latency import LatencyTable
from vitgraph.planning.plan import Plan
from vitgraph.planning.planner import CostModel
from vitgraph.targets import plan_to_target
from vitgraph.analysis.ops import register_rule
from vitgraph.scoring import Scores, score
from vitgraph.pipeline import PruneResult, prune
from vitgraph.verify import verify_compressed

__all__ = [
    "Analysis", "ChannelGroup", "CostModel", "FrozenChannels", "LatencyTable", "Plan", "plan_to_target", "analyze", "compress",
    "mask", "register_rule", "reconstruct", "export_onnx", "load", "save", "score", "Scores", "prune", "PruneResult",
    "sparsify_24", "merge_heads", "head_merge_plan", "TraceError", "PlanError", "ScoreError", "AnalysisError", "ExportError",
    "VitgraphError",
    "verify_compressed", "CompressionMismatchError", "ArgumentError", "ArgumentTypeError", "DataError", "UnknownGroupError",
]
__version__ = "0.1.0"


def sparsify_24(module, method: str = "magnitude", **options):
    """A copy of ``module`` whose eligible Linear weights hold the 2:4 pattern (see passes.sparsity24)."""
    from vitgraph.passes.sparsity24 import sparsify_24 as _sparsify

    return _sparsify(module, method, **options)


def reconstruct(slim, dense, data, *, plan, **options):
    """``slim`` with the layers that read pruned channels refitted to ``dense`` (see passes.reconstruct)."""
    from vitgraph.passes.reconstruct import reconstruct as _reconstruct

    return _reconstruct(slim, dense, data, plan=plan, **options)


def merge_heads(analysis, heads):
    """UP-ViT head merging: the analysed model with consecutive heads merged (see passes.merge_heads)."""
    from vitgraph.passes.merge_heads import merge_heads as _merge

    return _merge(analysis, heads)


def head_merge_plan(merged_analysis, head_dim, scores=None, v_dim=None):
    """A plan keeping the best ``head_dim`` dims of every merged head (see passes.merge_heads)."""
    from vitgraph.passes.merge_heads import head_merge_plan as _plan

    return _plan(merged_analysis, head_dim, scores, v_dim)
