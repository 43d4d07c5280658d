"""Run under torchrun by tests/test_training.py: the training loop's passes on each rank's share."""
import os
import sys

import torch

from vitgraph.distributed import init_from_env, rank, shutdown

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/, for helpers.py
from helpers import train_all  # noqa: E402


def main(out: str) -> None:
    assert init_from_env("gloo"), "expected to run under torchrun with WORLD_SIZE >= 2"
    res = train_all(batch_size=4)  # each rank takes half the batches (lists) or half the examples (DataLoader)
    if rank() == 1:
        torch.save(res, out + ".rank1")
    torch.distributed.barrier()
    if rank() == 0:
        torch.save(res, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
    # results are on disk and the process group is gone: skip interpreter finalisation, where
    # gloo's worker threads can abort the process (SIGABRT at exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
