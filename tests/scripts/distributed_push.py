"""Push a checkpoint's prototypes, under torchrun or as one process, and save the result.

    torchrun --nproc_per_node=2 tests/scripts/distributed_push.py CHECKPOINT OUT.pt
    python tests/scripts/distributed_push.py CHECKPOINT OUT.pt

Used by tests/test_distributed.py to show that a distributed push selects exactly the prototypes a
single process selects.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from datasets import EvalTransform, TransformedDataset, build_datasets  # noqa: E402
from model import build_model  # noqa: E402
from settings import Config  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.distributed import current_context, destroy, init_distributed_mode  # noqa: E402
from utils.projection import push_prototypes  # noqa: E402


def main(checkpoint: str, out: str) -> None:
    init_distributed_mode("cpu")
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"])
    model = build_model(config, load_pretrained=False)
    model.load_state_dict(state["model"])
    train = build_datasets(config).train
    provenance = push_prototypes(model, TransformedDataset(train, EvalTransform(config.image_size)), torch.device("cpu"),
                                 batch_size=5, progress=False, image_ids=train.image_ids)
    if current_context().is_main:
        torch.save(dict(prototypes=model.prototypes.detach(), provenance=provenance), out)
    destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
