"""Model code shared by the prefill and decode services: config, weights, state, the two code paths, sampling."""

from qwenpd.engine.config import PRESETS, ConfigError, ModelConfig, preset
from qwenpd.engine.engine import DecodeBatch, Engine, EngineConfig, chunk_spans
from qwenpd.engine.sampling import Sampler, SamplingParams
from qwenpd.engine.state import HybridState

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "preset", "DecodeBatch", "Engine", "EngineConfig",
           "chunk_spans", "Sampler", "SamplingParams", "HybridState"]
