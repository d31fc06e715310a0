"""Push a checkpoint's prototypes, under torchrun or as one process, and save the result.

    torchrun --nproc_per_node=2 tests/scripts/distributed_push.py CHECKPOINT OUT.pt [MAX_CELL_SHARE]
    python tests/scripts/distributed_push.py CHECKPOINT OUT.pt [MAX_CELL_SHARE]

Used by tests/test_distributed.py to show that a distributed push selects exactly the prototypes a
single process selects. With MAX_CELL_SHARE below 1 the prototypes are first set so that the plain push
would pile some of them onto one cell, and the cell cap binds.
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


def main(checkpoint: str, out: str, max_cell_share: float = 1.0) -> None:
    init_distributed_mode("cpu")
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"])
    model = build_model(config, load_pretrained=False)
    model.load_state_dict(state["model"])
    train = build_datasets(config).train
    dataset = TransformedDataset(train, EvalTransform(config.image_size))
    if max_cell_share < 1.0:
        # Each class's prototypes all start at the mean of its images' features on the cell where those
        # features vary least, so that the plain push piles some of them onto that cell.
        model.eval()
        with torch.no_grad():
            images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
            features = torch.cat([model.extract_features(chunk) for chunk in images.split(16)]).flatten(2)  # [N, D, HW]
            for klass in range(model.num_classes):
                own = features[torch.as_tensor(train.targets[:, klass]) > 0]
                steadiest = int(own.var(dim=0).sum(dim=0).argmin())
                model.prototypes[model.prototype_class == klass] = own[:, :, steadiest].mean(dim=0)
    provenance = push_prototypes(model, dataset, torch.device("cpu"),
                                 batch_size=5, progress=False, image_ids=train.image_ids,
                                 max_cell_share=max_cell_share)
    if current_context().is_main:
        torch.save(dict(prototypes=model.prototypes.detach(), provenance=provenance), out)
    destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(float(value) for value in sys.argv[3:4]))
