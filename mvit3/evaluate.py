"""`python -m mvit3 eval --data DIR --model NAME --checkpoint P`: top-1 / top-5 accuracy of a
model on an ImageFolder tree (the ImageNet val layout: one folder per class, class index =
position of the folder in sorted order), images/s, and with `--compare-reference` how often
the fast model's top-1 equals the reference model's.

Under `torchrun --nproc-per-node N -m mvit3 eval ...` each process evaluates its shard of the
images (DistributedSampler) and the counts are all-reduced: each image is counted exactly once.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .command_utils import add_model_arguments, build_model, read_image
from .preprocess import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """(image [3, crop, crop] in the model's input format, class index) per file of a class tree."""

    def __init__(self, root: str, preprocess_cfg):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r} is not a directory")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = [
            (os.path.join(root, name, file), index)
            for index, name in enumerate(self.classes)
            for file in sorted(os.listdir(os.path.join(root, name)))
            if file.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not self.samples:
            raise FileNotFoundError(f"--data {root!r} holds no class folder with images "
                                    f"({', '.join(IMAGE_EXTENSIONS)}): expected DIR/<class>/<image>")
        self.preprocess_cfg = preprocess_cfg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            image = read_image(path)
        except OSError as err:
            raise OSError(f"cannot read image {path!r}: {err}") from None
        return preprocess(image, self.preprocess_cfg)[0], label


def shard(dataset, rank: int, world: int) -> list:
    """This rank's image indices, each image on exactly one rank.

    DistributedSampler (shuffle=False) gives rank r the positions r, r + world, ... of
    [0..N) extended by repeats of its first images until every rank has ceil(N / world). The
    repeats sit at positions >= N, the tail of each rank's list, so keeping the first
    len(range(r, N, world)) indices drops exactly them.
    """
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    return list(sampler)[:len(range(rank, len(dataset), world))]


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="ImageFolder tree: DIR/<class>/<image>")
    add_model_arguments(parser, checkpoint_required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes per GPU/process")
    parser.add_argument("--compare-reference", action="store_true",
                        help="also run the reference model; report how often the top-1 agrees")
    parser.add_argument("--json", metavar="F", help="write the result to this JSON file")


def _distributed(device: str):
    """(rank, world, device) under torchrun, (0, 1, device) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def run(args) -> int:
    if args.batch_size < 1 or args.workers < 0:
        print(f"error: --batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and "
              f"{args.workers}", file=sys.stderr)
        return 2
    if args.compare_reference and args.backend == "reference":
        print("error: --compare-reference compares a fast model with the reference: give a fast "
              "--backend (auto, torch, triton or cuda)", file=sys.stderr)
        return 2
    rank, world, device = _distributed(args.device)
    try:
        return _evaluate(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _evaluate(args, rank: int, world: int, device) -> int:
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("eval shows its progress with tqdm: pip install tqdm (or the "
                          "'tools' extra: pip install mvit3[tools])") from None
    model = build_model(args.model, args.checkpoint, args.backend, device)
    reference = build_model(args.model, args.checkpoint, "reference", device) if args.compare_reference else None
    dataset = ImageFolder(args.data, model.preprocess)
    if len(dataset.classes) > model.num_classes:
        raise ValueError(f"--data has {len(dataset.classes)} class folders but {args.model} has "
                         f"{model.num_classes} outputs")
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        sampler=shard(dataset, rank, world))
    # counts: images, top-1 hits, top-5 hits, top-1 agreements with the reference
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=f"eval {args.model}", unit="batch", disable=rank != 0):
            images, labels = images.to(device), labels.to(device)
            top5 = model(images).topk(min(5, model.num_classes), dim=-1).indices  # [B, 5]
            counts[0] += labels.numel()
            counts[1] += (top5[:, 0] == labels).sum()
            counts[2] += (top5 == labels[:, None]).any(dim=-1).sum()
            if reference is not None:
                counts[3] += (reference(images).argmax(dim=-1) == top5[:, 0]).sum()
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest shard sets the pace
    images, top1, top5, agree = counts.tolist()
    result = {"model": args.model, "checkpoint": args.checkpoint, "backend": args.backend,
              "data": args.data, "images": int(images), "classes": len(dataset.classes),
              "top1": top1 / images, "top5": top5 / images,
              "images_per_second": images / seconds.item(), "processes": world}
    if reference is not None:
        result["agreement_with_reference"] = agree / images
    if rank == 0:
        print(f"{args.model} on {int(images)} images ({world} process{'es' * (world > 1)}): "
              f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, "
              f"{result['images_per_second']:.1f} images/s (data loading included)")
        if reference is not None:
            print(f"top-1 agreement with the reference model: {result['agreement_with_reference']:.2%}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0
