"""`lit_mpdit.latents`, kept as an import path (`python -m lit_mpdit prepare-latents` in cli.py, tests/test_latents.py):
the encoder now lives in `lit_mpdit.data.latents`, beside the latents files and `LatentsDataModule`.
"""
from lit_mpdit.data.latents import DEFAULT_VAE, STORAGE_DTYPES, load_vae, main, prepare_latents, resolve_vae

__all__ = ["DEFAULT_VAE", "STORAGE_DTYPES", "load_vae", "main", "prepare_latents", "resolve_vae"]
