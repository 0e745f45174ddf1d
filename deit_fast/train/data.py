"""Datasets, transforms, samplers and loaders (DeiT's datasets.py + samplers.py, on timm.data).

Reproducibility is designed in rather than bolted on: every training sample is augmented under an
RNG seeded from (seed, epoch, rank, position in the epoch), and every epoch's order comes from a
sampler seeded by (seed, epoch). A batch is therefore a pure function of (seed, epoch, step) no
matter how many workers load it, whether they are persistent, or whether the run was resumed
halfway through the epoch: that is what makes an interrupted and resumed run equal the
uninterrupted one.
"""
import contextlib
import os
import random
import shutil
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

DATA_SETS = ("IMNET", "FOLDER", "DIGITS")


# ---------------------------------------------------------------------------------------------
# The bundled real dataset: scikit-learn's handwritten digits as an ImageFolder of PNGs
# ---------------------------------------------------------------------------------------------

def materialize_digits(root: str, size: int = 32) -> str:
    """Write sklearn's 1797 8x8 digits as root/<size>px/{train,val}/<digit>/<n>.png, upsampled
    (bicubic) to size x size RGB, with a fixed 80/20 split (independent of --seed, so every run
    is scored on the same 360 test images); return root/<size>px. They then go through exactly
    the ImageNet pipeline. Idempotent."""
    final = os.path.join(root, f"{size}px")
    if os.path.isdir(final):
        return final
    from PIL import Image
    from sklearn.datasets import load_digits  # ships the data inside the wheel: no download

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    n_train = int(0.8 * len(order))
    tmp = f"{final}.tmp-{os.getpid()}"  # written aside, then renamed: complete or absent
    for split, idx in (("train", order[:n_train]), ("val", order[n_train:])):
        for i in idx:
            folder = os.path.join(tmp, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
            img = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(os.path.join(folder, f"{i:04d}.png"))
    try:
        os.rename(tmp, final)
    except OSError:  # another process (a DDP rank) got there first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Transforms and datasets
# ---------------------------------------------------------------------------------------------

def _posterize(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits: "inc" RandAugment policies ask for 0 kept bits at full
    magnitude (a black image, which Pillow < 12 returned), and Pillow >= 12 raises instead."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep)


def build_transform(is_train: bool, args):
    """DeiT's build_transform: timm's create_transform (RandAugment, random erasing) for training;
    resize + center crop (eval_crop_ratio) for eval. At <= 32 px (CIFAR-sized, and our digits)
    the official code swaps the random-resized crop for a padded random crop and skips the eval
    resize: a crop of 8 % of a 32 px image keeps almost nothing."""
    resize_im = args.input_size > 32
    if is_train:
        t = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=None if args.aa in (None, "", "none") else args.aa,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, hflip=args.hflip)
        if not resize_im:
            t.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        rand_augment = next((x for x in t.transforms if isinstance(x, RandAugment)), None)
        for op in rand_augment.ops if rand_augment is not None else []:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
        return t
    tl = []
    if resize_im:
        size = int(args.input_size / args.eval_crop_ratio)
        tl += [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
               transforms.CenterCrop(args.input_size)]
    tl += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(tl)


def build_dataset(is_train: bool, args) -> Tuple[Dataset, int]:
    """(dataset, number of classes). IMNET / FOLDER: data_path/{train,val}/<class>/<image>;
    DIGITS: the bundled digits, materialised under data_path/<input size>px (data_path default:
    output_dir/digits)."""
    root = args.data_path
    if args.data_set == "DIGITS":
        root = materialize_digits(root or os.path.join(args.output_dir or ".", "digits"), args.input_size)
    if not root:
        raise ValueError(f"--data-path is required for --data-set {args.data_set}")
    split = os.path.join(root, "train" if is_train else "val")
    if not os.path.isdir(split):
        raise FileNotFoundError(f"{split} does not exist: --data-path must hold train/ and val/ "
                                f"folders with one subfolder per class (ImageFolder layout)")
    dataset = datasets.ImageFolder(split, transform=build_transform(is_train, args))
    nb_classes = len(dataset.classes)
    train_split = os.path.join(root, "train")
    if not is_train and os.path.isdir(train_split):
        # ImageFolder numbers each split's folders on its own: a class missing from val/ would
        # shift every label after it onto the wrong class.
        train_classes = dataset.find_classes(train_split)[0]
        if dataset.classes != train_classes:
            differ = sorted(set(dataset.classes) ^ set(train_classes))
            raise ValueError(f"--data-path {root}: val/ and train/ must hold the same class folders; "
                             f"in one only: {', '.join(differ[:10])}{' ...' if len(differ) > 10 else ''}")
    if args.data_set == "IMNET" and nb_classes != 1000:
        raise ValueError(f"{split} holds {nb_classes} class folders, ImageNet has 1000 "
                         f"(use --data-set FOLDER for other folder datasets)")
    return dataset, nb_classes


# ---------------------------------------------------------------------------------------------
# Seeded sampling: (index, seed) pairs, and a dataset that augments under that seed
# ---------------------------------------------------------------------------------------------

def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers: SeedSequence hashes them, so neighbouring steps or samples
    get unrelated streams (seed + step would make run seed 1 step 0 == run seed 0 step 1)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under fixed python / numpy / torch-CPU RNG states and restore them after: with
    num_workers=0 the transforms run in the main process, whose streams must not be disturbed."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])


class SeededDataset(Dataset):
    """dataset[(index, seed)]: the sample at index, augmented under RNG seed `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with seeded(seed):
            return self.dataset[index]


class SeededBatchSampler:
    """Batches of (index, seed) pairs for SeededDataset, drop_last (mixup needs full, even
    batches). The order comes from `sampler` (RepeatAugSampler or DistributedSampler, both
    rank-aware), re-seeded per epoch; set_epoch(epoch, start_step, end_step) skips the batches a
    resumed run has already trained on, and those past --steps-per-epoch, without loading them."""

    def __init__(self, sampler, batch_size: int, seed: int, rank: int):
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank
        self.epoch, self.start_step, self.end_step = 0, 0, None

    def set_epoch(self, epoch: int, start_step: int = 0, end_step: Optional[int] = None) -> None:
        self.epoch, self.start_step, self.end_step = epoch, start_step, end_step
        # RepeatAugSampler shuffles by epoch alone; offsetting by the seed lets --seed change the
        # order too (DistributedSampler mixes its own seed in as well: harmless).
        self.sampler.set_epoch(epoch + 100_003 * self.seed)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        indices = list(self.sampler)
        bs = self.batch_size
        end = len(indices) // bs if self.end_step is None else min(self.end_step, len(indices) // bs)
        for step in range(self.start_step, end):
            yield [(idx, mix_seed(self.seed, self.epoch, self.rank, step * bs + j))
                   for j, idx in enumerate(indices[step * bs:(step + 1) * bs])]


class ShardSampler(torch.utils.data.Sampler):
    """Eval order: rank r takes r, r + world, ...; no padding, so the reduced counts are exact
    (DistributedSampler repeats samples to even out the shards)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(args, rank: int, world: int, pin_memory: bool = False):
    """(train_loader, val_loader, nb_classes). The train loader yields batches of (image, target)
    on CPU (pinned when pin_memory: --pin-mem on a GPU run); its batch_sampler has set_epoch."""
    train_set, nb_classes = build_dataset(True, args)
    val_set, _ = build_dataset(False, args)
    if args.repeated_aug:
        sampler = RepeatAugSampler(train_set, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=args.seed)
    batch_sampler = SeededBatchSampler(sampler, args.batch_size, args.seed, rank)
    if len(batch_sampler) == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than this rank's share of the "
                         f"{len(train_set)} training images")
    workers = dict(num_workers=args.num_workers, pin_memory=pin_memory,
                   persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(SeededDataset(train_set), batch_sampler=batch_sampler, **workers)
    val_loader = DataLoader(val_set, sampler=ShardSampler(len(val_set), rank, world),
                            batch_size=int(1.5 * args.batch_size), drop_last=False, **workers)
    return train_loader, val_loader, nb_classes


# ---------------------------------------------------------------------------------------------
# Synthetic batches and the device prefetcher
# ---------------------------------------------------------------------------------------------

class SyntheticLoader:
    """A few random batches created once on the device and cycled: measures the model, not the
    disk or the JPEG decoder (--synthetic)."""

    def __init__(self, args, nb_classes: int, device: torch.device, steps: int, n_buffers: int = 4):
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        shape = (args.batch_size, 3, args.input_size, args.input_size)
        self.batches = [(torch.randn(shape, generator=g).to(device),
                         torch.randint(0, nb_classes, (args.batch_size,), generator=g).to(device))
                        for _ in range(n_buffers)]
        self.steps, self.start_step = steps, 0
        self.batch_sampler = self  # the loop calls loader.batch_sampler.set_epoch

    def set_epoch(self, epoch: int, start_step: int = 0, end_step: Optional[int] = None) -> None:
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            x, y = self.batches[step % len(self.batches)]
            yield x.clone(), y  # mixup works in place: keep the buffers intact


def to_device(batch, device: torch.device, non_blocking: bool = True):
    return tuple(t.to(device, non_blocking=non_blocking) for t in batch)


def prefetch(loader, device: torch.device) -> Iterator:
    """Yield the loader's batches on `device`, the copy of batch i+1 overlapping the compute of
    batch i on a side CUDA stream (pinned memory makes the copy asynchronous). On CPU, as is."""
    if device.type != "cuda":
        yield from loader
        return
    stream = torch.cuda.Stream(device)
    it = iter(loader)

    def load():
        batch = next(it, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return to_device(batch, device)

    nxt = load()
    while nxt is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        cur = nxt
        for t in cur:  # the allocator must not hand these to the side stream while in use
            t.record_stream(torch.cuda.current_stream(device))
        nxt = load()
        yield cur


def build_mixup(args, nb_classes: int) -> Optional[Mixup]:
    """timm's Mixup/CutMix (label smoothing inside the soft targets), or None when both are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)
