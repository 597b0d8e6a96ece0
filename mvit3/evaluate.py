"""`python -m mvit3 eval --task cls|seg|det --data DIR --model NAME --checkpoint P`: the
paper's accuracy tables on the user's copy of the datasets, each beside the paper's figure.

- cls: top-1 / top-5 on an ImageFolder tree (the ImageNet val layout: one folder per class,
  class index = position of the folder in sorted order), Table 2;
- seg: mIoU (ignore label 255) on PASCAL VOC 2012 (`JPEGImages`, `SegmentationClass`,
  `ImageSets/Segmentation/val.txt`), Table 3a, or ADE20K (`images/validation`,
  `annotations/validation`, labels shifted by -1 as the official dataset class does), Table 3b;
  the dataset is the model's (deeplabv3_*_voc / *_ade20k);
- det: COCO mAP@[.5:.95] and its breakdown through pycocotools on COCO 2017 (`val2017`,
  `annotations/instances_val2017.json`), Tables 4a / 4b.

Images go through the official evaluation pipeline of the weights' family (`mvit3.preprocess`,
`mvit3.dense_eval`), read from their files by that family's library. Every task reports
images/s (data loading included) and, with `--compare-reference`, how far a fast model is
from the reference model (top-1 agreement, pixel agreement, mAP difference).

Under `torchrun --nproc-per-node N -m mvit3 eval ...` each process evaluates its shard of the
images (`shard`: DistributedSampler without its padding repeats); counts and confusion
matrices are all-reduced and COCO detections gathered from every process, so each image
counts once.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import metrics
from .command_utils import add_model_arguments, build_model
from .dense_eval import detection_input, detection_output, segmentation_input, segmentation_output
from .models import list_models
from .preprocess import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
TASKS = {"cls": "mobilevit*", "seg": "deeplabv3*", "det": "ssdlite*"}  # task -> its model names

# The paper's figure for each model: (table, value in %, note). Table 2 reports the v3
# XXS/XS/S at two training batch sizes; the released checkpoints are the batch-384 ones (their
# folder names end in the accuracy, e.g. mobilevitv3_XXS_e300_7098), listed here. Table 5
# gives the top-1 of the two-block (_l2) models.
PAPER_FIGURES = {
    "mobilevit_xxs": ("Table 2", 69.00, ""), "mobilevit_xs": ("Table 2", 74.8, ""),
    "mobilevit_s": ("Table 2", 78.4, ""),
    "mobilevitv2_050": ("Table 2", 70.18, ""), "mobilevitv2_075": ("Table 2", 75.56, ""),
    "mobilevitv2_100": ("Table 2", 78.09, ""),
    "mobilevitv3_xxs": ("Table 2", 70.98, "trained at batch 384; 70.02 at batch 192"),
    "mobilevitv3_xs": ("Table 2", 76.7, "trained at batch 384; 76.3 at batch 192"),
    "mobilevitv3_s": ("Table 2", 79.3, "trained at batch 384; 78.8 at batch 192"),
    "mobilevitv3_xxs_l2": ("Table 5", 70.23, ""), "mobilevitv3_xs_l2": ("Table 5", 76.1, ""),
    "mobilevitv3_s_l2": ("Table 5", 79.06, ""),
    "mobilevitv3_050": ("Table 2", 72.33, ""), "mobilevitv3_075": ("Table 2", 76.55, ""),
    "mobilevitv3_100": ("Table 2", 78.64, ""),
    "deeplabv3_mobilevitv3_xxs_voc": ("Table 3a", 74.04, ""),
    "deeplabv3_mobilevitv3_xs_voc": ("Table 3a", 78.77, ""),
    "deeplabv3_mobilevitv3_s_voc": ("Table 3a", 79.59, ""),
    "deeplabv3_mobilevitv3_050_voc": ("Table 3a", 76.48, ""),
    "deeplabv3_mobilevitv3_100_voc": ("Table 3a", 80.04, ""),
    "deeplabv3_mobilevitv3_050_ade20k": ("Table 3b", 33.57, ""),
    "deeplabv3_mobilevitv3_075_ade20k": ("Table 3b", 36.43, ""),
    "deeplabv3_mobilevitv3_100_ade20k": ("Table 3b", 39.13, ""),
    "ssdlite_mobilevitv3_xxs_coco": ("Table 4a", 19.3, ""),
    "ssdlite_mobilevitv3_xs_coco": ("Tables 4a, 4b", 25.6, ""),
    "ssdlite_mobilevitv3_s_coco": ("Table 4b", 27.3, ""),
    "ssdlite_mobilevitv3_050_coco": ("Table 4a", 21.8, ""),
    "ssdlite_mobilevitv3_075_coco": ("Table 4a", 25.0, ""),
    "ssdlite_mobilevitv3_100_coco": ("Table 4b", 27.0, ""),
}
METRIC = {"cls": ("top1", "top-1"), "seg": ("miou", "mIoU"), "det": ("map", "mAP@[.5:.95]")}


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    return path


class ImageFolder(Dataset):
    """(image [3, crop, crop] in the model's input format, class index) per file of a class tree."""

    def __init__(self, root: str, model):
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
                                    f"({', '.join(IMAGE_EXTENSIONS)}): expected "
                                    f"DIR/<class>/<image>")
        if len(self.classes) > model.num_classes:
            raise ValueError(f"--data has {len(self.classes)} class folders but the model has "
                             f"{model.num_classes} outputs")
        self.preprocess_cfg = model.preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]  # the path: read by the family's library
        return preprocess(path, self.preprocess_cfg)[0], label


class SegmentationSet(Dataset):
    """(network input [1, 3, h, w], image (H, W), label map [H, W] int64 with 255 = ignore)
    per (image, mask) pair of a VOC 2012 or ADE20K tree, the layout chosen by the model's
    dataset."""

    def __init__(self, root: str, model):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r} is not a directory")
        self.model, self.dataset = model, model.cfg.dataset
        if self.dataset == "voc":
            names = _require(os.path.join(root, "ImageSets", "Segmentation", "val.txt"),
                             "VOC 2012 image list (DIR/ImageSets/Segmentation/val.txt)")
            with open(names) as f:
                stems = [line.strip() for line in f if line.strip()]
            self.pairs = [(os.path.join(root, "JPEGImages", f"{stem}.jpg"),
                           os.path.join(root, "SegmentationClass", f"{stem}.png"))
                          for stem in stems]
        else:
            images = _require(os.path.join(root, "images", "validation"),
                              "ADE20K image folder (DIR/images/validation)")
            masks = _require(os.path.join(root, "annotations", "validation"),
                             "ADE20K annotation folder (DIR/annotations/validation)")
            self.pairs = [(os.path.join(images, file),
                           os.path.join(masks, os.path.splitext(file)[0] + ".png"))
                          for file in sorted(os.listdir(images))
                          if file.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.pairs:
            raise FileNotFoundError(f"--data {root!r} lists no {self.dataset} validation image")
        for image, mask in self.pairs:
            _require(image, "image")
            _require(mask, f"label mask of {image!r}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        from PIL import Image  # here: the cls task needs no PIL when OpenCV reads its images

        image, mask_path = self.pairs[index]
        x, size = segmentation_input(image, self.model)
        with Image.open(mask_path) as mask:
            if mask.mode not in ("P", "L"):
                raise ValueError(f"label mask {mask_path!r} is a {mask.mode} image: expected "
                                 f"class indices (a palette or greyscale PNG)")
            labels = np.array(mask)
        if labels.shape != tuple(size):
            raise ValueError(f"label mask {mask_path!r} is {labels.shape[0]}x{labels.shape[1]}, "
                             f"its image {size[0]}x{size[1]}")
        if self.dataset == "ade20k":
            labels = metrics.ade20k_labels(labels)
        return x, size, torch.from_numpy(labels.astype(np.int64))


class COCODetectionSet(Dataset):
    """(network input [1, 3, s, s], image (H, W), COCO image id) per image of the COCO 2017
    val annotations (all of them, also those without objects, as the official eval)."""

    def __init__(self, root: str, model):
        annotations = _require(os.path.join(root, "annotations", "instances_val2017.json"),
                               "COCO annotation file (DIR/annotations/instances_val2017.json)")
        self.model = model
        self.coco = metrics.load_coco(annotations)
        self.category_ids = metrics.coco_category_ids(self.coco)
        if len(self.category_ids) != model.num_classes - 1:
            raise ValueError(f"{annotations!r} has {len(self.category_ids)} categories; the model "
                             f"predicts {model.num_classes - 1} (and background)")
        self.image_ids = sorted(self.coco.getImgIds())
        self.files = [_require(os.path.join(root, "val2017", self.coco.imgs[i]["file_name"]),
                               "image") for i in self.image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index):
        x, size = detection_input(self.files[index], self.model)
        return x, size, self.image_ids[index]


DATASETS = {"cls": ImageFolder, "seg": SegmentationSet, "det": COCODetectionSet}


def shard(dataset, rank: int, world: int) -> list:
    """This rank's image indices, each image on exactly one rank.

    DistributedSampler (shuffle=False) gives rank r the positions r, r + world, ... of
    [0..N) extended by repeats of its first images until every rank has ceil(N / world). The
    repeats sit at positions >= N, the tail of each rank's list, so keeping the first
    len(range(r, N, world)) indices drops exactly them.
    """
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False,
                                 drop_last=False)
    return list(sampler)[:len(range(rank, len(dataset), world))]


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=TASKS, default="cls",
                        help="cls: ImageNet top-1/top-5 (default); seg: VOC / ADE20K mIoU; "
                             "det: COCO mAP")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="cls: DIR/<class>/<image>; seg: the VOC2012 or ADEChallengeData2016 "
                             "folder; det: the COCO folder holding val2017 and annotations")
    add_model_arguments(parser, checkpoint_required=True,
                        models=list_models(TASKS["seg"]) + list_models(TASKS["det"]))
    parser.add_argument("--batch-size", type=int, default=64,
                        help="cls only; seg and det run one image per forward (images differ "
                             "in size)")
    parser.add_argument("--workers", type=int, default=4,
                        help="data-loading processes per GPU/process")
    parser.add_argument("--compare-reference", action="store_true",
                        help="also run the reference model; report the fast model's agreement "
                             "with it")
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
    if args.model not in list_models(TASKS[args.task]):
        print(f"error: --task {args.task} evaluates {', '.join(list_models(TASKS[args.task]))}; "
              f"{args.model} is not one of them", file=sys.stderr)
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


def _sum_over_processes(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def _classify(model, reference, batches, dataset, device, world: int) -> dict:
    # counts: images, top-1 hits, top-5 hits, top-1 agreements with the reference
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        top5 = model(images).topk(min(5, model.num_classes), dim=-1).indices  # [B, 5]
        counts[0] += labels.numel()
        counts[1] += (top5[:, 0] == labels).sum()
        counts[2] += (top5 == labels[:, None]).any(dim=-1).sum()
        if reference is not None:
            counts[3] += (reference(images).argmax(dim=-1) == top5[:, 0]).sum()
    images, top1, top5, agree = _sum_over_processes(counts, world).tolist()
    result = {"images": int(images), "classes": len(dataset.classes),
              "top1": top1 / images, "top5": top5 / images}
    if reference is not None:
        result["top1_agreement_with_reference"] = agree / images
    return result


def _segment(model, reference, batches, dataset, device, world: int) -> dict:
    confusion = torch.zeros(model.num_classes, model.num_classes, dtype=torch.int64, device=device)
    agreement = torch.zeros(2, dtype=torch.int64, device=device)  # equal pixels, pixels
    images = torch.zeros(1, dtype=torch.int64, device=device)
    for x, size, target in batches:
        labels, _ = segmentation_output(model, x, size)  # [H, W] at the image size
        confusion += metrics.confusion_matrix(labels, target, model.num_classes)
        images += 1
        if reference is not None:
            agreement += torch.stack([(segmentation_output(reference, x, size)[0] == labels).sum(),
                                      torch.tensor(labels.numel(), device=labels.device)])
    confusion = _sum_over_processes(confusion, world)
    result = {"images": int(_sum_over_processes(images, world).item()),
              **metrics.mean_iou(confusion)}
    if reference is not None:
        equal, pixels = _sum_over_processes(agreement, world).tolist()
        result["pixel_agreement_with_reference"] = equal / pixels
    return result


def _gather_lists(items: list, world: int) -> list:
    """Every process's list, concatenated in rank order (the same on every process)."""
    if world == 1:
        return items
    gathered = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _detect(model, reference, batches, dataset, device, world: int) -> dict:
    found = {"model": [], "reference": []}
    for x, size, image_id in batches:
        for key, net in (("model", model), ("reference", reference)):
            if net is not None:
                found[key] += metrics.coco_detections(image_id, detection_output(net, x, size),
                                                      dataset.category_ids)
    # every process gathers all detections and scores them alike; only rank 0 prints
    detections = {key: _gather_lists(rows, world) for key, rows in found.items()}
    stats, summary = metrics.coco_map(dataset.coco, detections["model"], dataset.image_ids)
    result = {"images": len(dataset), "map": stats["AP"], "coco": stats, "coco_summary": summary}
    if reference is not None:
        reference_stats, _ = metrics.coco_map(dataset.coco, detections["reference"],
                                              dataset.image_ids)
        result["map_minus_reference_map"] = stats["AP"] - reference_stats["AP"]
    return result


class _Stopwatch:
    """Iterates `batches`; `seconds` is the time from the first request to the end of the last
    batch's processing, so images/s counts data loading and the model, not the metric after."""

    def __init__(self, batches):
        self.batches, self.seconds = batches, None

    def __iter__(self):
        start = time.perf_counter()
        yield from self.batches
        self.seconds = time.perf_counter() - start


def _paper(model_name: str, measured: float) -> dict:
    if model_name not in PAPER_FIGURES:
        return {}
    table, value, note = PAPER_FIGURES[model_name]
    return {"paper": {"table": table, "value": value / 100, "note": note,
                      "measured_minus_paper": measured - value / 100}}


def _evaluate(args, rank: int, world: int, device) -> int:
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("eval shows its progress with tqdm: pip install tqdm (or the "
                          "'tools' extra: pip install mvit3[tools])") from None
    try:
        model = build_model(args.model, args.checkpoint, args.backend, device)
    except TypeError as err:  # mvit3.fast.convert refuses a model it has no fast version of
        print(f"error: --backend {args.backend}: {err}", file=sys.stderr)
        return 2
    reference = (build_model(args.model, args.checkpoint, "reference", device)
                 if args.compare_reference else None)
    try:
        dataset = DATASETS[args.task](args.data, model)
    except (FileNotFoundError, ValueError) as err:  # a layout or annotation problem, named
        print(f"error: {err}", file=sys.stderr)
        return 2
    # seg / det items are single images of their own size: no batching (batch_size=None)
    batch_size = args.batch_size if args.task == "cls" else None
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=args.workers,
                        sampler=shard(dataset, rank, world))
    run_task = {"cls": _classify, "seg": _segment, "det": _detect}[args.task]
    with torch.inference_mode():
        batches = _Stopwatch(tqdm(loader, desc=f"eval {args.model}",
                                  unit="batch" if batch_size else "image", disable=rank != 0))
        result = run_task(model, reference, batches, dataset, device, world)
    seconds = torch.tensor([batches.seconds], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest shard sets the pace
    key, metric_name = METRIC[args.task]
    result = {"task": args.task, "model": args.model, "checkpoint": args.checkpoint,
              "backend": args.backend, "data": args.data, **result,
              "images_per_second": result["images"] / seconds.item(), "processes": world,
              **_paper(args.model, result[key])}
    if rank == 0:
        _print(result, metric_name, result[key])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


def _print(result: dict, metric_name: str, measured: float) -> None:
    processes = result["processes"]
    print(f"{result['model']} on {result['images']} images "
          f"({processes} process{'es' * (processes > 1)}): {metric_name} {measured:.2%}, "
          f"{result['images_per_second']:.1f} images/s (data loading included)")
    if "paper" in result:
        paper = result["paper"]
        note = f"; {paper['note']}" if paper["note"] else ""
        print(f"paper ({paper['table']}): {metric_name} {paper['value']:.2%}{note}; "
              f"measured - paper: {paper['measured_minus_paper'] * 100:+.2f} points")
    else:
        print(f"paper: no {metric_name} figure for {result['model']} in Tables 2-5")
    if "top5" in result:
        print(f"top-5 {result['top5']:.2%}")
    if "pixel_accuracy" in result:
        print(f"pixel accuracy {result['pixel_accuracy']:.2%}")
    if "coco_summary" in result:
        print(result["coco_summary"])
    for name in ("top1_agreement_with_reference", "pixel_agreement_with_reference"):
        if name in result:
            print(f"{name.replace('_', ' ')}: {result[name]:.2%}")
    if "map_minus_reference_map" in result:
        print(f"mAP - reference mAP: {result['map_minus_reference_map'] * 100:+.2f} points")
