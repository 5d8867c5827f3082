"""The prefill role: run prompts, sample the first token, hold the KV under a lease until it is pulled."""
