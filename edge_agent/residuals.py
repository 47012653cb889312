"""Error feedback: what a lossy codec did not transmit stays on the device and rides the next delta.

For each update the agent encodes ``x = delta + residual``, decodes its own tensors with the very
decoder the aggregator runs (so it knows exactly what the receiver rebuilds) and keeps
``x - decoded`` as the new residual. Whatever top-k leaves out or quantisation rounds away is
therefore sent later instead of lost: the sum of everything the receiver rebuilt plus the
residual equals the sum of the deltas, and a coordinate keeps growing in the residual until it
is large enough to be among the top k.

The residual lives in ``<state_dir>/residual-<fingerprint>.weights`` in fedge's checkpoint
format (raw float32 msgpack, never pickle), written atomically, so a reboot keeps it. It belongs
to one architecture: a model with another fingerprint starts from zero and the old file is
removed. A lossless chain leaves nothing behind and the file disappears.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_agent.files import atomic_write
from fedge_contract import DecodeError
from fedge_contract.codecs import CodecChain, EncodedTensor, decode_weights, encode_weights, fitted_to
from fedge_contract.messages import pack_weights, unpack_weights
from fedge_contract.tensors import ModelSpec

log = logging.getLogger("fedge.agent.residuals")

Weights = dict[str, np.ndarray]


class Residuals:
    """The error-feedback memory of one agent, persisted in its state folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, fingerprint: str) -> Path:
        return self.directory / f"residual-{fingerprint}.weights"

    def load(self, spec: ModelSpec) -> Weights | None:
        """The residual for this architecture, or None (none yet, or unreadable: start from zero)."""
        path = self.path(spec.fingerprint)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            weights = unpack_weights(blob)
        except DecodeError as exc:
            log.warning("ignoring unreadable residual %s: %s", path, exc)
            return None
        if ModelSpec.of(weights).fingerprint != spec.fingerprint:
            log.warning("ignoring residual %s: its tensors do not match the model", path)
            return None
        return weights

    def save(self, spec: ModelSpec, residual: Mapping[str, np.ndarray]) -> None:
        """Persist (atomically) the residual of this architecture; drop other architectures' files."""
        path = self.path(spec.fingerprint)
        if any(np.any(values) for values in residual.values()):
            atomic_write(path, pack_weights(residual))
        else:
            path.unlink(missing_ok=True)
        for other in self.directory.glob("residual-*.weights"):
            if other != path:
                other.unlink(missing_ok=True)

    def encode(
        self, delta: Mapping[str, np.ndarray], chain: CodecChain, spec: ModelSpec, rng: np.random.Generator | None = None
    ) -> tuple[tuple[EncodedTensor, ...], Weights | None]:
        """Encode ``delta + residual``; returns the tensors and the new residual to ``save``.

        The new residual is None when there is nothing to update: the input was not finite (the
        aggregator will refuse the update; the old residual stays as it was).
        """
        previous = self.load(spec)
        x = {name: (values + previous[name] if previous is not None else values).astype(np.float32, copy=False) for name, values in delta.items()}
        tensors = encode_weights(x, fitted_to(chain, x), rng)  # a delta that moved few weights sends no zeros
        if not chain.lossy:
            return tensors, {name: np.zeros_like(values) for name, values in x.items()}
        try:
            sent = decode_weights(tensors, spec)
        except DecodeError as exc:
            log.error("the encoded delta does not decode (%s): keeping the previous residual", exc)
            return tensors, None
        return tensors, {name: x[name] - sent[name] for name in x}
