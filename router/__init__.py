"""The OpenAI-compatible router: HTTP in, Prefill on the prefill pool, Decode on the decode pool, SSE out."""
