"""What the prefill and decode workers share: the async engine loop, config, the gRPC server shell."""
