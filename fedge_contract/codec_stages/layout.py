"""flat: encode a whole model (or delta) as one vector instead of tensor by tensor.

Per-tensor encoding pays, for every tensor, a wire map (name, dtype, shape, codec), a compressor
frame and its own top-k budget. On a small model that overhead is most of the message: the
digits MLP's 1% top-k update carried ~460 bytes of framing for ~300 bytes of values. ``flat``
concatenates the tensors in the model's order into one float32 vector, so the message carries one
tensor (named ``*``, shape ``[num_parameters]``), one compressor frame, and top-k picks the
largest coordinates across the whole model rather than a fixed share of each tensor: a layer whose
delta is small this round gives its budget to a layer that moved. The receiver splits the vector
back by its own ModelSpec, so nothing about the split travels or can be forged.
"""

from __future__ import annotations

from fedge_contract.errors import CodecError

FLAT_NAME = "*"  # never a torch parameter name (they are dotted identifiers)


class Flat:
    def __init__(self, arg: str) -> None:
        if arg:
            raise CodecError(f"flat takes no argument, got 'flat:{arg}'")
        self.text = "flat"
