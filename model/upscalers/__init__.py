"""The Upscaler protocol and its implementations: Lanczos, SpaSemSR, Real-ESRGAN."""
