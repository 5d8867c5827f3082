"""Tensor parallelism: the rank group and its collectives (group.py), the ranks' processes (ranks.py, rank.py),
the message that tells them what each step computes (step.py) and how KV heads lie across ranks (kv_heads.py).
The parallel layers themselves are in engine/models/parallel.py; docs/parallel.md explains the whole.
"""
