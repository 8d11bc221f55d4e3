"""`python -m lit_mpdit prepare-latents`: encode an image folder into VAE posteriors for `LatentsDataModule`.

The paper's setting is ImageNet-1k at 128×128 through stabilityai/sd-vae-ft-mse, giving 4×16×16 latents.
diffusers is an optional extra (`pip install 'lit_mpdit[latents]'`). The VAE is a local directory written by
`AutoencoderKL.save_pretrained` or a Hugging Face hub id (which needs the network once).

Stored per image: the posterior mean and std, so training draws a fresh latent every time it sees the image.
Stored per dataset: per-channel shift and scale (mean and std of one sampled latent per image), which
normalize the latents to zero mean and unit variance, in place of the VAE's single global scaling factor.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lit_mpdit.data import ImageFileDataset, keep_batch, save_latents, scan_image_folder
from lit_mpdit.errors import ConfigError, check_choice

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def resolve_vae(vae: str) -> str:
    """A local VAE directory as an absolute path (so samples decode from anywhere), a hub id as it is."""
    local = Path(vae).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if vae.startswith(("/", ".", "~")):  # meant as a path: do not ask the hub for it
        raise ConfigError(f"--vae {vae!r}: no such directory")
    return vae


def load_vae(vae: str, device: str) -> Any:
    """diffusers' AutoencoderKL from a local directory or a hub id, in eval mode without gradients."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ConfigError("prepare-latents needs diffusers: pip install 'lit_mpdit[latents]'") from e
    try:
        model = AutoencoderKL.from_pretrained(resolve_vae(vae), low_cpu_mem_usage=False)
    except Exception as e:  # missing files, no network, a folder of another model: all mean the same to the user
        raise ConfigError(
            f"--vae {vae!r}: cannot load an AutoencoderKL ({type(e).__name__}: {e}). Pass a local directory written "
            "by AutoencoderKL.save_pretrained, or a hub id while online."
        ) from e
    return model.to(device).eval().requires_grad_(False)


def prepare_latents(
    image_root: str | Path,
    out: str | Path,
    *,
    vae: str = DEFAULT_VAE,  # local AutoencoderKL directory or hub id
    image_size: int = 128,  # images are center-cropped and resized to this side before encoding
    batch_size: int = 32,  # images per encoder call
    device: str = "cpu",
    dtype: str = "float32",  # storage of mean and std: float32, or float16 to halve a large file
    num_workers: int = 0,  # DataLoader processes decoding the images
    seed: int = 0,  # the noise of the latents sampled for the statistics
) -> Path:
    """Encode the class-per-folder tree `image_root` and write `out` (.pt, read memory-mapped, or .npz)."""
    check_choice("--dtype", dtype, STORAGE_DTYPES)
    check_choice("--out suffix", Path(out).suffix, (".pt", ".npz"))
    files, labels, class_names = scan_image_folder(image_root, option="--images")  # fail before loading the VAE
    vae = resolve_vae(vae)
    model = load_vae(vae, device)
    dataset = ImageFileDataset(files, torch.tensor(labels), image_size, channels=model.config.in_channels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=keep_batch)
    generator = torch.Generator(device).manual_seed(seed)
    means, stds = [], []
    count, total, squares = 0, 0.0, 0.0  # per channel: n, Σz, Σz² (float64 tensors after the first batch)
    with torch.no_grad():
        for x, _ in tqdm(loader, desc="encoding", unit="batch", disable=None):
            posterior = model.encode(x.to(device)).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=device)
            z = z.double().cpu().transpose(0, 1).flatten(1)  # (C, N·H·W)
            count, total, squares = count + z.shape[1], total + z.sum(1), squares + z.square().sum(1)
            means.append(posterior.mean.cpu().to(STORAGE_DTYPES[dtype]))
            stds.append(posterior.std.cpu().to(STORAGE_DTYPES[dtype]))
    shift = total / count
    scale = (squares / count - shift.square()).sqrt()
    record = {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "shift": shift.float(),
        "scale": scale.float(),
        "vae": vae,
        "num_classes": len(class_names),
        "class_names": class_names,
        "image_size": image_size,
    }
    return save_latents(out, record)


def main(argv: list[str] | None = None) -> None:
    """python -m lit_mpdit prepare-latents --images DIR --out latents.pt: encode an image folder for `LatentsDataModule`."""
    p = argparse.ArgumentParser(prog="python -m lit_mpdit prepare-latents", description=main.__doc__)
    p.add_argument("--images", required=True, help="class-per-folder image tree: DIR/<class>/<image>.png|jpg")
    p.add_argument("--out", required=True, help="latents file to write: .pt (read memory-mapped) or .npz")
    p.add_argument("--vae", default=DEFAULT_VAE, help="local AutoencoderKL directory or hub id (online)")
    p.add_argument("--image-size", type=int, default=128, help="side the images are cropped and resized to")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=list(STORAGE_DTYPES), help="storage of mean and std")
    p.add_argument("--workers", type=int, default=0, help="processes decoding the images")
    p.add_argument("--seed", type=int, default=0, help="noise of the latents sampled for the statistics")
    args = p.parse_args(argv)
    path = prepare_latents(
        args.images,
        args.out,
        vae=args.vae,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        num_workers=args.workers,
        seed=args.seed,
    )
    print(path)
