"""Run under torchrun by tests/test_scores.py: score and fine-tune a tiny ViT on sharded batches."""
import copy
import os
import sys

import torch

import vitgraph
from vitgraph.distributed import init_from_env, rank, shutdown
from vitgraph.passes.recovery import finetune

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/, for helpers.py
from helpers import score_setup  # noqa: E402


def main(out: str) -> None:
    assert init_from_env("gloo"), "expected to run under torchrun with WORLD_SIZE >= 2"
    model, an, data = score_setup()
    res = {m: dict(vitgraph.score(model, an, m, data=data, **kw))
           for m, kw in (("hessian", {}), ("kl", {"mode": "approx"}))}
    # data-parallel fine-tuning: ranks see different batches but must end with the same weights
    student = copy.deepcopy(model)
    if rank() == 1:
        with torch.no_grad():
            next(student.parameters()).add_(1.0)  # broadcast from rank 0 must undo this
    finetune(student, data[:3], teacher=model, loss="upvit", lr=1e-3, log_every=0)  # 3 batches: uneven over 2 ranks
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    spread = flat.clone()
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
    low = flat.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    res["finetune_spread"] = float((spread - low).abs().max())
    res["finetune_changed"] = float((flat - torch.cat([p.detach().flatten() for p in model.parameters()])).abs().max())
    if rank() == 0:
        torch.save(res, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
    # The results are on disk and the process group is gone: leave without interpreter
    # finalisation, where gloo's worker threads can abort the process (SIGABRT at exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
