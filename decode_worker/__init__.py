"""The decode role: pull a prompt's KV from a prefill worker, then generate in the running batch."""
