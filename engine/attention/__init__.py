"""Attention backends: a small interface, a torch reference, a registry."""

from engine.attention.base import AttentionBackend, AttentionMetadata, get_attention_backend, register_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend", "register_backend"]
