"""SpaSemSR model code: pure PyTorch / diffusers / transformers.

This package knows nothing of HTTP, Redis, environment variables or settings objects
(DESIGN 3.1): callers pass plain arguments.
"""
