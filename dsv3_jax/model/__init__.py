"""Flax NNX modules of DeepSeek-V3: MLA, DeepSeekMoE, multi-token prediction."""

from dsv3_jax.model.config import ModelConfig, RopeScaling
from dsv3_jax.model.mla import MultiHeadLatentAttention
from dsv3_jax.model.moe import DeepSeekMoE, Router, RouterBias, route, sequence_balance_loss
from dsv3_jax.model.transformer import (DecoderLayer, ModelOutput, MultiTokenPrediction,
                                        Transformer, abstract_model)

__all__ = [
    "ModelConfig", "RopeScaling", "MultiHeadLatentAttention", "DeepSeekMoE", "Router",
    "RouterBias", "route", "sequence_balance_loss", "DecoderLayer", "ModelOutput",
    "MultiTokenPrediction", "Transformer", "abstract_model",
]
