"""The image dataset over the protocol's metadata, its transforms, and the project's one image loader.

Images are `<data_root>/<image_id>`, read with PIL and converted to RGB (spec §1.3). Transforms:
  train  Resize((R, R)) (PIL bilinear, aspect ignored), RandomCrop(S), RandomHorizontalFlip,
         ToTensor, Normalize(ImageNet mean/std)
  test   Resize((S, S)), ToTensor, Normalize - no crop
with S the crop size (224 in the protocol) and R = round(S * 256 / 224) (256 at 224).
"""
from __future__ import annotations

import copy

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from wsolbench.datasets.metadata import SplitMetadata
from wsolbench.errors import InputError, WsolbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The one image loader: PIL, converted to RGB; a one-line error naming the file otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(path, "image file does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(path, f"unreadable image ({error})") from None


def resize_size(crop_size: int) -> int:
    """The protocol's 256-for-224 resize, scaled to other crop sizes."""
    return round(crop_size * 256 / 224)


def train_transform(crop_size: int = 224) -> Callable:
    size = resize_size(crop_size)
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_transform(crop_size: int = 224) -> Callable:
    return transforms.Compose([
        transforms.Resize((crop_size, crop_size)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class WSOLImageDataset(Dataset):
    """(image tensor, class label, index into metadata.image_ids) for every image of a split."""

    def __init__(self, metadata: SplitMetadata, data_root: str | os.PathLike, transform: Callable,
                 augmentation_seed: int | None = None):
        self.metadata = metadata
        self.data_root = Path(data_root)
        self.transform = transform
        self.labels = [metadata.class_labels[i] for i in metadata.image_ids]
        # With a seed, image i's random transform is drawn from (seed, i) alone: the same crop in
        # whichever loader worker, and on whichever rank, the image lands (harness/distributed.py).
        self.augmentation_seed = augmentation_seed

    def seeded(self, augmentation_seed: int) -> "WSOLImageDataset":
        """This dataset with its augmentation drawn per image from `augmentation_seed` (one epoch's)."""
        view = copy.copy(self)
        view.augmentation_seed = augmentation_seed
        return view

    def __len__(self) -> int:
        return len(self.metadata.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = load_image(self.data_root / self.metadata.image_ids[index])
        if self.augmentation_seed is None:
            return self.transform(image), self.labels[index], index
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (the transforms' only one): torch.manual_seed also seeds every
            # accelerator and costs 60 us, against 2 us here.
            torch.default_generator.manual_seed((self.augmentation_seed * 1_000_003 + index) % (2 ** 63))
            return self.transform(image), self.labels[index], index

    def check_images(self, workers: int = 8, progress: Callable[[int], None] | None = None) -> None:
        """Fail before training if an image is missing or its header is unreadable (quick: no decode)."""
        if not self.data_root.is_dir():
            raise WsolbenchError(f"{self.data_root}: image folder (--data-root) does not exist")
        ids = self.metadata.image_ids

        def check(chunk: list[str]) -> None:
            for image_id in chunk:
                path = self.data_root / image_id
                try:
                    with Image.open(path) as image:
                        image.size  # noqa: B018 - parses the header only
                except FileNotFoundError:
                    raise InputError(path, f"image file does not exist (image id {image_id!r} of "
                                           f"{self.metadata.dataset}/{self.metadata.split})") from None
                except (UnidentifiedImageError, OSError, ValueError) as error:
                    raise InputError(path, f"unreadable image ({error})") from None

        chunks = [ids[i:i + 256] for i in range(0, len(ids), 256)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for chunk, _ in zip(chunks, pool.map(check, chunks)):
                if progress is not None:
                    progress(len(chunk))
