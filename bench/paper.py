"""The MobileViTv3 paper's Tables 5, 3 and 4, as data: the figures measured benchmarks are set
beside.

Source: Wadekar & Chaurasia, "MobileViTv3: Mobile-Friendly Vision Transformer with Simple and
Effective Fusion of Local, Global and Input Features" (2022), section 4.4 and Table 5.
Latency and throughput are the paper's own measurements on an NVIDIA GeForce RTX 2080 Ti, fp32,
256x256: latency is the mean of 10,000 batch-1 runs timed with CUDA events, throughput comes
from 1,000 runs at batch 100. They are not measurements made by mvit3.
Tables 3 and 4 (sections 4.2, 4.3) give the segmentation and detection models' parameters and
accuracy only: the paper times no dense model and counts none of their FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PAPER_DEVICE = "NVIDIA GeForce RTX 2080 Ti"
PAPER_SOURCE = "MobileViTv3 paper (Wadekar & Chaurasia, 2022), Table 5"
PAPER_LABEL = f"paper, {PAPER_DEVICE}"

# The paper's timing protocol (section 4.4, and `main_latency.py` of the official repository).
PAPER_PROTOCOL = {
    "dtype": "fp32",
    "img_size": 256,
    "warmup": 10,
    "latency_batch": 1,
    "latency_iters": 10_000,
    "throughput_batch": 100,
    "throughput_iters": 1_000,
    "statistic": "mean",
}


@dataclass(frozen=True)
class PaperRow:
    model: str  # the mvit3 model name
    paper_name: str  # as printed in the paper
    blocks: int  # transformer layers in layer_4 ("Blocks" column)
    flops_m: float  # "FLOPs (M)": the cvnets profiler's MACs, i.e. mvit3's macs_cvnets
    params_m: float
    top1: float  # ImageNet-1k top-1 (%)
    throughput_img_s: float  # batch 100, images per second, RTX 2080 Ti
    latency_ms: float  # batch 1, mean, RTX 2080 Ti


TABLE5 = (
    PaperRow("mobilevit_xxs", "MobileViTv1-XXS", 4, 364, 1.30, 69.00, 2124, 7.24),
    PaperRow("mobilevitv3_xxs", "MobileViTv3-XXS", 4, 289, 1.25, 70.98, 2146, 7.12),
    PaperRow("mobilevitv3_xxs_l2", "MobileViTv3-XXS", 2, 256, 1.14, 70.23, 2308, 6.24),
    PaperRow("mobilevit_xs", "MobileViTv1-XS", 4, 986, 2.3, 74.80, 1097, 7.32),
    PaperRow("mobilevitv3_xs", "MobileViTv3-XS", 4, 927, 2.5, 76.7, 1078, 7.20),
    PaperRow("mobilevitv3_xs_l2", "MobileViTv3-XS", 2, 853, 2.3, 76.1, 1129, 6.35),
    PaperRow("mobilevit_s", "MobileViTv1-S", 4, 2009, 5.6, 78.40, 822, 7.34),
    PaperRow("mobilevitv3_s", "MobileViTv3-S", 4, 1841, 5.8, 79.3, 824, 7.29),
    PaperRow("mobilevitv3_s_l2", "MobileViTv3-S", 2, 1651, 5.2, 79.06, 876, 6.60),
)
TABLE5_MODELS = tuple(row.model for row in TABLE5)

# The comparisons the paper draws from Table 5: (numerator, denominator, label).
RATIO_PAIRS = tuple(
    pair
    for size in ("xxs", "xs", "s")
    for pair in (
        (f"mobilevitv3_{size}", f"mobilevit_{size}", f"v3-{size.upper()} vs v1-{size.upper()}"),
        (f"mobilevitv3_{size}_l2", f"mobilevit_{size}", f"v3-{size.upper()}-L2 vs v1-{size.upper()}"),
        (f"mobilevitv3_{size}_l2", f"mobilevitv3_{size}",
         f"v3-{size.upper()}: 2 vs 4 layers in layer_4"),
    )
)


def paper_row(model: str) -> Optional[PaperRow]:
    """The Table 5 row of an mvit3 model name, or None for models the table does not list."""
    for row in TABLE5:
        if row.model == model:
            return row
    return None


DENSE_SOURCE = "MobileViTv3 paper (Wadekar & Chaurasia, 2022), Tables 3 and 4"


@dataclass(frozen=True)
class DensePaperRow:
    model: str  # the mvit3 model name
    paper_name: str  # the backbone as printed in the paper
    table: str  # "3a" (PASCAL VOC 2012), "3b" (ADE20K), "4" (COCO: 4a and 4b agree)
    params_m: float  # "# Params (M)": the whole model without the aux head (dense-spec section 6)
    metric: str
    score: float


def _dense_rows(table: str, task: str, dataset: str, metric: str, rows: tuple) -> tuple:
    return tuple(DensePaperRow(f"{task}_mobilevitv3_{size}_{dataset}", f"MobileViTv3-{printed}",
                               table, params_m, metric, score)
                 for size, printed, params_m, score in rows)


# The MobileViTv3 rows of Tables 3a, 3b, 4a and 4b, in the paper's order.
DENSE_PAPER = (
    *_dense_rows("3a", "deeplabv3", "voc", "VOC mIOU (%)", (
        ("xxs", "XXS", 1.96, 74.04), ("050", "0.5", 6.3, 76.48), ("xs", "XS", 3.3, 78.77),
        ("s", "S", 7.2, 79.59), ("100", "1.0", 13.56, 80.04))),
    *_dense_rows("3b", "deeplabv3", "ade20k", "ADE20K mIOU (%)", (
        ("050", "0.5", 6.37, 33.57), ("075", "0.75", 9.71, 36.43), ("100", "1.0", 13.62, 39.13))),
    *_dense_rows("4", "ssdlite", "coco", "COCO mAP (%)", (
        ("xxs", "XXS", 1.53, 19.3), ("050", "0.5", 2, 21.8), ("075", "0.75", 3.7, 25.0),
        ("xs", "XS", 2.7, 25.6), ("100", "1.0", 5.8, 27.0), ("s", "S", 5.5, 27.3))),
)


def dense_paper_row(model: str) -> Optional[DensePaperRow]:
    """The Table 3/4 row of a dense mvit3 model, or None (v3-0.75 on VOC is not in the paper)."""
    return next((row for row in DENSE_PAPER if row.model == model), None)
