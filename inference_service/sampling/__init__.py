"""Sampling: per-request parameters and the host sampler (logits row → next token).

Backends and the engine both import this package; it imports neither of them."""
