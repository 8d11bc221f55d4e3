"""VAE latents, all in one module: the latents file IO (`save_latents`, `load_latents`), `LatentDataset` (a
fresh latent drawn from every stored posterior at each fetch), `LatentsDataModule`, and the encoder that
writes the files (`prepare_latents`, `load_vae`, and `main` behind `python -m lit_mpdit prepare-latents`).

`python -m lit_mpdit prepare-latents`: encode an image folder into VAE posteriors for `LatentsDataModule`.

The paper's setting is ImageNet-1k at 128×128 through stabilityai/sd-vae-ft-mse, giving 4×16×16 latents.
diffusers is an optional extra (`pip install 'lit_mpdit[latents]'`). The VAE is a local directory written by
`AutoencoderKL.save_pretrained` or a Hugging Face hub id (which needs the network once).

Stored per image: the posterior mean and std, so training draws a fresh latent every time it sees the image.
Stored per dataset: per-channel shift and scale (mean and std of one sampled latent per image), which
normalize the latents to zero mean and unit variance, in place of the VAE's single global scaling factor.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lit_mpdit.data.base import Batch, BatchDataset, HeldOutDataModule, Indices, draw_images, keep_batch
from lit_mpdit.data.image_folder import ImageFileDataset, scan_image_folder
from lit_mpdit.errors import ConfigError, check_choice, check_output_file, check_range
from lit_mpdit.images import to_uint8

LATENT_KEYS = ("mean", "std", "labels", "shift", "scale", "vae")  # required; optional: num_classes, class_names, image_size


def save_latents(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a latents file: `.pt` (read back memory-mapped) or `.npz`, through a temporary file.

    record: mean, std (N, C, H, W) tensors; labels (N,); shift, scale (C,) (z is normalized to (z − shift) / scale);
    vae (the AutoencoderKL that decodes them); optionally num_classes, class_names and image_size (of the pixels).
    """
    path = Path(path)
    check_choice("latents file suffix", path.suffix, (".pt", ".npz"))
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        torch.save(record, part)
    else:
        with open(part, "wb") as f:
            np.savez(f, **{k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in record.items()})
    os.replace(part, path)
    return path


def check_latent_arrays(path: Path, record: dict[str, Any]) -> None:
    """The shapes and dtypes the data module needs: float posteriors (N, C, H, W) of equal shape, integer
    labels (N,), per-channel float shift and scale (C,); else one `ConfigError` naming the file and the array."""
    arrays = {k: np.asarray(record[k]) if not isinstance(record[k], torch.Tensor) else record[k].numpy() for k in ("mean", "std", "labels", "shift", "scale")}
    mean = arrays["mean"]
    for key in ("mean", "std", "shift", "scale"):
        if arrays[key].dtype not in (np.float16, np.float32, np.float64):
            raise ConfigError(f"{path}: array {key!r} is {arrays[key].dtype}; allowed: float16, float32, float64")
    if mean.ndim != 4 or arrays["std"].shape != mean.shape:
        raise ConfigError(f"{path}: mean {mean.shape} and std {arrays['std'].shape} must both be N×C×H×W")
    labels = arrays["labels"]
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != mean.shape[:1]:
        raise ConfigError(f"{path}: labels are {labels.dtype} {labels.shape}; expected integers, one per latent ({mean.shape[0]})")
    for key in ("shift", "scale"):
        if arrays[key].shape != mean.shape[1:2]:
            raise ConfigError(f"{path}: {key} {arrays[key].shape} must be one value per channel ({mean.shape[1]})")


def load_latents(path: str | Path) -> dict[str, Any]:
    """Read a file written by `save_latents`: tensors for the arrays, str/int/list[str] for the rest."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.path: latents file {path} does not exist (make it with `python -m lit_mpdit prepare-latents`)")
    try:
        if path.suffix == ".pt":
            record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with np.load(path) as arrays:
                record = {k: arrays[k] for k in arrays.files}
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not a latents file ({e!r})") from e
    missing = [k for k in LATENT_KEYS if k not in record]
    if missing:
        raise ConfigError(f"{path}: latents file lacks {', '.join(missing)} (required: {', '.join(LATENT_KEYS)})")
    check_latent_arrays(path, record)
    out = {k: torch.as_tensor(record[k]) for k in ("mean", "std", "labels", "shift", "scale")}
    out["labels"] = out["labels"].long()
    out["vae"] = str(record["vae"])
    if "num_classes" in record:
        out["num_classes"] = int(record["num_classes"])
    if "image_size" in record:
        out["image_size"] = int(record["image_size"])
    if "class_names" in record:
        out["class_names"] = [str(name) for name in record["class_names"]]
    return out


class LatentDataset(BatchDataset):
    """VAE posteriors: every fetch draws z = mean + std·ε afresh and normalizes it to (z − shift) / scale."""

    def __init__(
        self,
        mean: torch.Tensor,  # (N, C, H, W) posterior means, float16 or float32, possibly memory-mapped
        std: torch.Tensor,  # (N, C, H, W) posterior standard deviations
        labels: torch.Tensor,  # (N,) int64
        shift: torch.Tensor,  # (C,) dataset mean of the latents
        scale: torch.Tensor,  # (C,) dataset standard deviation of the latents
        rows: torch.Tensor | None = None,  # this dataset's rows of the arrays; None = all
    ):
        # Subsets index the shared arrays instead of copying them: a memory-mapped file stays on disk.
        self.mean, self.std, self.all_labels = mean, std, labels
        self.rows = torch.arange(len(labels)) if rows is None else rows
        self.labels = labels[self.rows]
        self.shift = shift.float().view(-1, 1, 1)
        self.scale = scale.float().view(-1, 1, 1)

    def __getitems__(self, indices: Indices) -> Batch:
        rows = self.rows[indices]
        mean = self.mean[rows].float()  # (N, C, H, W)
        z = mean + self.std[rows].float() * torch.randn_like(mean)  # a fresh sample of each posterior
        return (z - self.shift) / self.scale, self.labels[indices]

    def subset(self, indices: torch.Tensor) -> LatentDataset:
        return LatentDataset(self.mean, self.std, self.all_labels, self.shift, self.scale, self.rows[indices])


class LatentsDataModule(HeldOutDataModule):
    """Precomputed VAE posteriors (from `python -m lit_mpdit prepare-latents`): each batch draws fresh latents
    z = mean + std·ε and normalizes them per channel, (z − shift) / scale, with the dataset statistics stored
    beside them. `denormalize` undoes that before the VAE (`vae`) decodes samples."""

    def __init__(
        self,
        path: str,  # a .pt or .npz latents file
        batch_size: int = 128,  # examples per batch on each device
        num_workers: int = 0,  # DataLoader worker processes
        seed: int = 0,  # chooses the validation examples
        val_size: int = 1000,  # training examples held out for validation
        limit_train: int | None = None,  # train on the first N remaining training examples only; None = all
        references: dict[str, str] | None = None,  # FID reference split → class-per-folder tree of real images
    ):
        super().__init__(batch_size, num_workers, seed, val_size, limit_train)
        self.save_hyperparameters()
        record = load_latents(path)
        self.references = dict(references or {})
        for split, folder in self.references.items():
            if not Path(folder).is_dir():
                raise ConfigError(f"data.references.{split}: {folder} is not a directory (expected ROOT/<class>/<image>.png|jpg)")
        mean, std, labels, shift, scale = (record[k] for k in ("mean", "std", "labels", "shift", "scale"))
        n, channels, height, width = mean.shape if mean.ndim == 4 else (-1,) * 4
        shapes_agree = std.shape == mean.shape and labels.shape == (n,) and shift.shape == scale.shape == (channels,)
        if mean.ndim != 4 or height != width or not shapes_agree:
            raise ConfigError(
                f"{path}: mean {tuple(mean.shape)} and std {tuple(std.shape)} must be (N, C, H, H), labels "
                f"{tuple(labels.shape)} (N,), shift {tuple(shift.shape)} and scale {tuple(scale.shape)} (C,)"
            )
        self.image_size, self.in_channels = height, channels
        self.pixel_size = record.get("image_size", 8 * height)  # side of the images the latents encode
        self.num_classes = record.get("num_classes", int(labels.max()) + 1)
        self.class_names = record.get("class_names", [str(i) for i in range(self.num_classes)])
        self.vae = record["vae"]
        self.shift, self.scale = shift.float(), scale.float()
        self._record = record
        self._vae: dict[torch.device, Any] = {}

    def _load(self) -> dict[str, BatchDataset]:
        r = self._record
        return {"train": LatentDataset(r["mean"], r["std"], r["labels"], self.shift, self.scale)}

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents (N, C, H, W) → the VAE's latent space (before its own scaling factor)."""
        return z * self.scale.view(-1, 1, 1).to(z) + self.shift.view(-1, 1, 1).to(z)

    def check_reference(self, split: str) -> None:
        if split not in self.references:
            raise ConfigError(
                f"data.references: FID compares samples with real images, and reference split {split!r} has none; "
                f"give data.references.{split}: a class-per-folder tree (e.g. ImageNet's validation images); "
                f"given: {', '.join(map(repr, self.references)) or 'none'}"
            )

    def reference_source(self, split: str) -> str:
        self.check_reference(split)
        folder = Path(self.references[split]).resolve()
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
        return f"{folder.name}-{digest}-{self.pixel_size}px"

    def reference_images(self, split: str = "val", n: int | None = None) -> torch.Tensor:
        """`n` real images of reference split `split` (a folder of `references`), cropped and resized as the
        training images were before encoding, as uint8 (N, 3, H, W); a subset drawn by `seed` when n is smaller."""
        self.check_reference(split)
        files, labels, _ = scan_image_folder(self.references[split], option=f"data.references.{split}")
        return draw_images(ImageFileDataset(files, torch.tensor(labels), self.pixel_size, channels=3), n, self.seed)

    @torch.no_grad()
    def to_images(self, samples: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Generated normalized latents → uint8 images, decoded by the VAE that encoded the training set."""
        vae = self._vae.get(samples.device)
        if vae is None:  # loaded once per device: decoding is called for every evaluation
            vae = self._vae[samples.device] = load_vae(self.vae, str(samples.device))
        decoded = [vae.decode(self.denormalize(z.float())).sample for z in samples.split(batch_size)]
        return to_uint8(torch.cat(decoded))


# ---------------------------------------------------------------------------------------------------------
# Encoding an image folder: `python -m lit_mpdit prepare-latents`

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
    check_output_file(out, "--out", (".pt", ".npz"))  # before minutes of encoding whose result it would lose
    check_range("--image-size", image_size, 1)
    check_range("--batch-size", batch_size, 1)
    check_range("--workers", num_workers, 0)
    files, labels, class_names = scan_image_folder(image_root, option="--images")  # fail before loading the VAE
    vae = resolve_vae(vae)
    model = load_vae(vae, device)
    factor = 2 ** (len(model.config.block_out_channels) - 1)  # the encoder halves the side at each level but the last
    if image_size % factor:
        raise ConfigError(f"--image-size: {image_size} is not a multiple of {factor}, the downsampling of {vae}; allowed: {factor}, {2 * factor}, {3 * factor}, …")
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
