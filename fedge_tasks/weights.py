"""Moving weights between a torch module and the numpy dicts that travel on the wire.

Only floating-point entries of the state dict are federated; integer buffers (e.g. BatchNorm's
``num_batches_tracked``) stay local, since averaging a counter means nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def get_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A float32 copy of the model's floating-point state, in state-dict order."""
    return {
        name: tensor.detach().to(torch.float32).cpu().numpy().copy()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def set_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load federated weights into the model in place (names and shapes must match)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, values in weights.items():
            state[name].copy_(torch.from_numpy(np.asarray(values)))
