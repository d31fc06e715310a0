"""Shared fixtures: a configuration small enough to train, push and test in seconds on a CPU."""
import logging

import pytest
import torch

from settings import preset_config

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(tmp_path=None, **overrides):
    values = dict(
        backbone="tiny", image_size=64, prototype_dim=16, prototypes_per_class=2,
        synthetic_train_size=48, synthetic_val_size=32, synthetic_test_size=32, synthetic_decorrelated_test_size=16,
        epochs=4, warmup_epochs=1, push_epochs=(2, 3), last_layer_epochs=1,
        batch_size=4, samples_per_epoch=16, eval_batch_size=32, lr_milestones=(2,), num_workers=0,
        tensorboard=False,  # drawing push galleries costs seconds per run; tests/test_tensorboard_log.py turns it on
    )
    if tmp_path is not None:
        values["out_dir"] = str(tmp_path)
    values.update(overrides)
    return preset_config("synthetic", **values)


@pytest.fixture
def config_factory(tmp_path):
    def make(name="run", **overrides):
        return tiny_config(tmp_path / name, **overrides)

    return make


@pytest.fixture(autouse=True)
def _quiet_logging():
    logging.getLogger().setLevel(logging.WARNING)
    yield
