"""Low-precision ops: fine-grained FP8 (DeepSeek-V3 report §3.3) and LogFMT-nBit
(arXiv 2505.09343 §3.2), plus the all_to_all payload codecs built on them."""

from dsv3_jax.quant.codec import Fp8Codec, IdentityCodec, LogFmtCodec
from dsv3_jax.quant.fp8 import (FP8_FORMATS, Fp8Recipe, accumulate_dot, dequantize_blocks,
                                dequantize_tiles, fp8_format, fp8_matmul, qdq_blocks, qdq_tiles,
                                quantize_blocks, quantize_tiles)
from dsv3_jax.quant.logfmt import logfmt_decode, logfmt_encode, logfmt_qdq

__all__ = [
    "FP8_FORMATS", "Fp8Codec", "Fp8Recipe", "IdentityCodec", "LogFmtCodec", "accumulate_dot",
    "dequantize_blocks", "dequantize_tiles", "fp8_format", "fp8_matmul", "logfmt_decode",
    "logfmt_encode", "logfmt_qdq", "qdq_blocks", "qdq_tiles", "quantize_blocks",
    "quantize_tiles",
]
