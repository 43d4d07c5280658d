"""Run under torchrun by tests/test_scores.py: score a tiny ViT on sharded batches, save rank 0's result."""
import sys

import torch

import vitgraph
from vitgraph.distributed import init_from_env, rank

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_scores import score_setup  # noqa: E402


def main(out: str) -> None:
    assert init_from_env("gloo"), "expected to run under torchrun with WORLD_SIZE >= 2"
    model, an, data = score_setup()
    res = {m: dict(vitgraph.score(model, an, m, data=data, **kw))
           for m, kw in (("hessian", {}), ("kl", {"mode": "approx"}))}
    if rank() == 0:
        torch.save(res, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
