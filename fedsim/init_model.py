"""The initial global model from ``init.checkpoint`` (a pre-trained start, as in the backdoor
papers, whose runs begin from a clean model near 80 % accuracy)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedsim.config import ConfigError


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a ``state_dict`` saved with ``torch.save`` into ``model`` (in place).

    Never unpickles: ``torch.load(weights_only=True)``. Raises :class:`ConfigError` (a
    ``ValueError``; the CLI prints it as one line) naming ``init.checkpoint`` when the file is not
    a state_dict or its keys or shapes do not match.
    """
    try:
        sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"init.checkpoint: cannot read {path} as a weights-only state_dict ({err})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"init.checkpoint: {path} does not hold a state_dict of tensors")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"init.checkpoint: {path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ConfigError(
                f"init.checkpoint: {path}: '{k}' has shape {tuple(sd[k].shape)}, the model needs {tuple(v.shape)}"
            )
    model.load_state_dict({k: sd[k].to(dtype=v.dtype) for k, v in own.items()})
