"""The stages hold pre-existing objects out of the cyclic collector, and hand them back after."""
import gc

import pytest
import timm
import torch

import vitgraph
from vitgraph.gc_hold import holds_existing_objects


def test_frozen_during_and_released_after():
    seen = []

    @holds_existing_objects
    def stage():
        seen.append(gc.get_freeze_count())
        cycle = []
        cycle.append(cycle)  # garbage made inside the stage is still collected
        del cycle
        return gc.collect()

    before = gc.get_freeze_count()
    assert stage() >= 1
    assert seen[0] > 0 and gc.get_freeze_count() == before == 0


def test_nested_and_caller_freeze_untouched(monkeypatch):
    """Under a caller's own gc.freeze() the stage neither freezes nor unfreezes (the frozen count
    itself is not compared: frozen objects that die leave the permanent generation)."""
    calls = []
    gc.freeze()
    try:
        monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
        monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
        holds_existing_objects(lambda: None)()
        assert calls == []
    finally:
        monkeypatch.undo()
        gc.unfreeze()


def test_released_when_stage_raises():
    model = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=3, img_size=32, patch_size=16)
    with pytest.raises(vitgraph.TraceError):
        vitgraph.analyze(model, "not a tensor")
    assert gc.get_freeze_count() == 0
    an = vitgraph.analyze(model, torch.randn(1, 3, 32, 32))
    vitgraph.compress(model, vitgraph.Plan.from_scores(an, ratio=0.5))
    assert gc.get_freeze_count() == 0
