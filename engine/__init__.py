"""The inference core: model, paged KV cache, scheduler, sampler. No networking."""

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.request import InvalidRequestError, SamplingParams

__all__ = ["CacheConfig", "EngineConfig", "InvalidRequestError", "ModelConfig", "SamplingParams", "SchedulerConfig"]
