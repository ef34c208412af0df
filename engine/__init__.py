"""The model code the prefill and decode services share: config and presets (config.py), safetensors loading
(weights.py), the hybrid layers and model (layers.py, model.py), per-sequence state (state.py), the engine with
its two code paths, chunked prefill and batched decode (engine.py), sampling (sampling.py), stop conditions and
streamed text (output.py), the tokenizer (tokenizer.py), the in-process loop (generate.py) and `init-model`
(init_model.py). Math kernels come from qwenpd.kernels; nothing here knows about gRPC."""

from qwenpd.engine.config import PRESETS, ConfigError, ModelConfig, preset
from qwenpd.engine.engine import DecodeBatch, Engine, EngineConfig, chunk_spans
from qwenpd.engine.sampling import Sampler, SamplingParams
from qwenpd.engine.state import HybridState

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "preset", "DecodeBatch", "Engine", "EngineConfig",
           "chunk_spans", "Sampler", "SamplingParams", "HybridState"]
