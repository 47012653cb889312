"""Lossless last stages: zstd[:level] (frame format) and lz4 (block format).

Both decompressors are told the most bytes the shape allows (exact for every chain but one whose
positions are Rice-coded, which has a bound) and never produce more: a frame that declares or
yields more is refused before the bytes exist. lz4 travels as a bare LZ4 block
(no frame header: the size is known from the shape), which keeps tiny sparse tensors tiny.
"""

from __future__ import annotations

import lz4.block
import zstandard

from fedge_contract.errors import CodecError, DecodeError, Reason


class Zstd:
    def __init__(self, level: int | str = 3) -> None:
        if isinstance(level, str):
            if not level:
                level = 3
            else:
                try:
                    level = int(level)
                except ValueError:
                    raise CodecError(f"zstd level must be an integer, got {level!r}") from None
        if not 1 <= level <= 22:
            raise CodecError(f"zstd level must be 1..22, got {level}")
        self.level = level
        self.text = "zstd" if level == 3 else f"zstd:{level}"

    def compress(self, data: bytes) -> bytes:
        # a compressor per call: ZstdCompressor objects must not be shared between threads
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, data: bytes, max_size: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise DecodeError(Reason.BAD_TENSOR, f"not a zstd frame ({exc})") from None
        if declared > max_size:  # -1 (unknown) is bounded by max_output_size below
            raise DecodeError(Reason.BAD_TENSOR, f"zstd frame declares {declared} bytes, at most {max_size} expected")
        try:
            # one frame, nothing appended: trailing bytes are a malformed payload, not padding
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=max_size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise DecodeError(Reason.BAD_TENSOR, f"zstd: {exc}") from None


class LZ4:
    text = "lz4"

    def __init__(self, arg: str = "") -> None:
        if arg:
            raise CodecError("stage 'lz4' takes no argument")

    def compress(self, data: bytes) -> bytes:
        compressed: bytes = lz4.block.compress(data, store_size=False)
        return compressed

    def decompress(self, data: bytes, max_size: int) -> bytes:
        try:
            # the output buffer holds max_size bytes: a block that would write more fails
            out: bytes = lz4.block.decompress(data, uncompressed_size=max_size)
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise DecodeError(Reason.BAD_TENSOR, f"lz4: {exc}") from None
        return out
