"""The diffusion pipeline and what it runs with: prompts, tiling, colour fix."""
