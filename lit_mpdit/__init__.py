"""lit_mpdit: magnitude preservation and rotation modulation in Diffusion Transformers, as a Lightning suite."""
from lit_mpdit.dit import DiT, build_dit

__all__ = ["DiT", "build_dit"]
