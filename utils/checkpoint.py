"""Complete, atomically written checkpoints and their validation on load."""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cipl-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a CIPL checkpoint, or one of another configuration."""


def atomic_write_bytes(path: str | Path, writer) -> None:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            writer(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda stream: stream.write(text.encode()))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_checkpoint(path: str | Path, state: dict) -> None:
    state = dict(state, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    atomic_write_bytes(path, lambda stream: torch.save(state, stream))


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    # Only when the same GPUs are visible: every stage reseeds anyway, so this is a courtesy.
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """Read a CIPL checkpoint, refusing anything else with a one-line reason."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        path = candidate if candidate.is_file() else path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # The checkpoint holds numpy RNG state and plain Python objects besides tensors.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a CIPL checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    state["path"] = str(path)
    return state


def load_model_weights(model, state: dict) -> None:
    """``model.load_state_dict(state["model"])``, refusing with one line when the weights do not fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines()]
        first = lines[1] if len(lines) > 1 else lines[0]  # the first mismatch, under torch's header line
        raise CheckpointError(f"{state.get('path', 'checkpoint')}: its weights do not fit this model ({first})") from error


def check_compatible(state: dict, model) -> None:
    """Refuse a checkpoint whose model description (classes, backbone, sizes) differs from ``model``."""
    expected = model.description()
    found = state.get("model_description", {})
    for key, value in expected.items():
        if found.get(key) != value:
            raise CheckpointError(
                f"checkpoint {state.get('path', '')} was trained with {key}={found.get(key)!r}, "
                f"but this run has {key}={value!r}"
            )
