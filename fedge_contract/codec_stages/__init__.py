"""The stages a codec chain is built from, one module per kind.

Every stage is a small object built from its chain text (``q8:128``, ``topk:0.01``, ``zstd:5``),
knows its canonical text, and computes the sizes it will read from the shape alone: the decoder
bounds every buffer before it allocates it, and a payload carries no size field an attacker
could inflate.

    layout    flat                     (codec_stages.layout)
    sparsify  topk:<fraction>          (codec_stages.topk)
    positions rice                     (codec_stages.rice)
    value     f16, bf16                (codec_stages.casts)
              q8[:block], q4[:block]   (codec_stages.quant)
              sign[:block]             (codec_stages.sign)
    lossless  zstd[:level], lz4        (codec_stages.lossless)
"""

from fedge_contract.codec_stages.base import LosslessStage, SparsifyStage, ValueStage
from fedge_contract.codec_stages.casts import BF16, F16, F32
from fedge_contract.codec_stages.layout import FLAT_NAME, Flat
from fedge_contract.codec_stages.lossless import LZ4, Zstd
from fedge_contract.codec_stages.quant import Q4, Q8
from fedge_contract.codec_stages.rice import Rice
from fedge_contract.codec_stages.sign import Sign
from fedge_contract.codec_stages.topk import TopK

__all__ = [
    "BF16", "F16", "F32", "FLAT_NAME", "LZ4", "Q4", "Q8", "Flat", "LosslessStage", "Rice", "Sign", "SparsifyStage", "TopK",
    "ValueStage", "Zstd",
]
