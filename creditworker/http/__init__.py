"""HTTP adapters: the gateway (routes over the producer and the engine's reads) and the
reserve-then-deduct middleware for FastAPI apps. Both need the `http` extra."""
