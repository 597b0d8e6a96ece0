"""`python -m mvit3 bench` and its parts, on the CPU: the CLI end to end on one small model,
the paper's figures against the paper's text, the environment without NVML, timing, launch
counting, the micro-benchmark cases against the reference modules, and the reports."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from bench_synthetic import synthetic_result

import mvit3
from mvit3.__main__ import main
from mvit3.bench import env as bench_env
from mvit3.bench.cases import MICRO_MODELS, build_cases
from mvit3.bench.launches import count_launches, dry_run_host_ms
from mvit3.bench.paper import RATIO_PAIRS, TABLE5, TABLE5_MODELS
from mvit3.bench.report import compute_ratios, render_csv, render_markdown
from mvit3.bench import runner
from mvit3.bench.runner import RunConfig, plan_rows
from mvit3.bench.timing import PROTOCOLS, summarize, time_callable

REQUIRED_ROW_KEYS = ("model", "impl", "backend", "dtype", "latency_ms_median", "throughput_img_s",
                     "params", "macs_cvnets", "paper_latency_ms", "paper_throughput_img_s")


def markdown_tables(text: str) -> list:
    """Every markdown table of `text`, as lists of rows of cells."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def assert_well_formed(table: list) -> None:
    header, rule, *body = table
    assert all(set(cell) <= {"-"} and cell for cell in rule), rule
    assert len(rule) == len(header) and body
    for row in body:
        assert len(row) == len(header), row


# ---- the CLI -----------------------------------------------------------------------------------

def test_cli_quick_run_on_one_small_model(tmp_path, capsys):
    paths = {ext: tmp_path / f"out.{ext}" for ext in ("json", "csv", "md")}
    rc = main(["bench", "--quick", "--device", "cpu", "--models", "mobilevitv3_xxs_l2",
               "--throughput-batch", "2", "--backends", "torch,cuda", "--no-progress",
               "--json", str(paths["json"]), "--csv", str(paths["csv"]),
               "--markdown", str(paths["md"])])
    out = capsys.readouterr().out
    assert rc == 0
    assert paths["md"].read_text() == out

    tables = markdown_tables(out)
    for table in tables:
        assert_well_formed(table)
    measured = tables[0]
    assert measured[0][:2] == ["model", "implementation"]
    reference = next(row for row in measured[2:] if row[1] == "reference")
    assert reference[0] == "mobilevitv3_xxs_l2" and float(reference[3].replace(",", "")) > 0
    assert reference[6] == "6.240"  # the paper's RTX 2080 Ti latency beside the measurement
    assert "No GPU was used" in out and "skipped fast/cuda" in out

    assert str(bench_env.project_root()) not in paths["json"].read_text()
    result = json.loads(paths["json"].read_text())
    assert result["complete"] and result["env"]["device_type"] == "cpu"
    assert result["env"]["nvml"]["available"] is False and result["env"]["nvml"]["reason"]
    stats = mvit3.model_stats("mobilevitv3_xxs_l2")
    rows = {(r["impl"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {("reference", "eager"), ("fast", "torch"), ("fast", "cuda")}
    for row in rows.values():
        assert all(key in row for key in REQUIRED_ROW_KEYS)
        assert row["params"] == stats["params"] and row["macs_cvnets"] == stats["macs_cvnets"]
        assert row["paper_latency_ms"] == 6.24 and row["paper_throughput_img_s"] == 2308
    for key in (("reference", "eager"), ("fast", "torch")):
        row = rows[key]
        assert row["status"] == "ok", row["reason"]
        assert row["latency_ms_p10"] <= row["latency_ms_median"] <= row["latency_ms_p90"]
        assert row["throughput_img_s"] > 0 and row["throughput_batch"] == 2
        assert row["launches"] > 0 and row["launch_counts"]["aten_ops"] == row["launches"]
    # The fast model with the torch backend computes the reference math (fp32).
    assert rows[("fast", "torch")]["max_rel_err"] < 1e-5
    assert rows[("fast", "cuda")]["status"] == "skipped" and "cuda" in rows[("fast", "cuda")]["reason"]

    lines = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(lines) == 3 and {line["impl"] for line in lines} == {"reference", "fast"}


def test_timm_rows_time_timms_model_and_say_its_weights_are_random(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = main(["bench", "--quick", "--device", "cpu", "--models", "mobilevit_xxs",
               "--throughput-batch", "1", "--impls", "timm", "--no-progress",
               "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["timm"]
    timm_row = rows[0]
    assert timm_row["status"] == "ok", timm_row["reason"]
    assert timm_row["latency_ms_median"] > 0 and timm_row["launches"] > 0
    assert timm_row["max_rel_err"] is None  # other weights: nothing to compare
    assert timm_row["weights"] == runner.TIMM_WEIGHTS
    assert "| mobilevit_xxs | timm (random weights) |" in out
    assert f"timm rows: timm's own model of the same name, weights: {runner.TIMM_WEIGHTS}." in out


def test_plan_rows_by_implementation():
    config = RunConfig(device=torch.device("cuda"), dtype="fp16", protocol=PROTOCOLS["lease"],
                       throughput_batch=100, backends=("triton", "cuda"), compile=True,
                       compile_mode="default")
    specs = [(s.model, s.impl, s.backend) for s in plan_rows(["mobilevitv3_xs", "mobilevit_xs"], config)]
    assert specs == [
        ("mobilevitv3_xs", "reference", "eager"), ("mobilevitv3_xs", "fast", "triton"),
        ("mobilevitv3_xs", "fast", "cuda"), ("mobilevitv3_xs", "cuda-graph", "auto"),
        ("mobilevit_xs", "reference", "eager"), ("mobilevit_xs", "timm", "eager"),
        ("mobilevit_xs", "fast", "triton"), ("mobilevit_xs", "fast", "cuda"),
        ("mobilevit_xs", "cuda-graph", "auto"),
        ("mobilevitv3_xs", "compile", "default"), ("mobilevit_xs", "compile", "default"),
        ("mobilevit_xs", "timm-compile", "default")]
    config.impls = ("reference", "compile", "timm-compile")
    assert [(s.model, s.impl) for s in plan_rows(["mobilevit_xs"], config)] == [
        ("mobilevit_xs", "reference"), ("mobilevit_xs", "compile"), ("mobilevit_xs", "timm-compile")]


@pytest.mark.parametrize("argv, message", [
    (["--paper-protocol", "--dtype", "fp16"], "paper's exactly"),
    (["--models", "mobilevit_huge"], "no model matches"),
    (["--backends", "torch,metal"], "unknown"),
    (["--impls", "reference,onnx"], "--impls: unknown ['onnx']"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "mps"], "--device"),
    (["--device", "gpu0"], "--device must be"),
])
def test_cli_rejects_bad_arguments_before_running(argv, message, capsys):
    assert main(["bench", "--no-progress"] + argv) == 2
    assert message in capsys.readouterr().err


def test_cli_plot_without_matplotlib_says_so_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["bench", "--device", "cpu", "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) is not installed")
    from mvit3.bench.plot import plot_result

    plot_result(synthetic_result(), str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the paper's figures -------------------------------------------------------------------

# Table 5 of the MobileViTv3 paper, verbatim (tab-separated as extracted from the PDF).
PAPER_TABLE5_TEXT = """\
MobileViTv1-XXS	4	364	1.30	69.00	2124	7.24
MobileViTv3-XXS	4	289	1.25	70.98 ($\\uparrow 1.98\\%$)	2146	7.12
MobileViTv3-XXS	2	256 ($\\downarrow 30\\%$)	1.14	70.23 ($\\uparrow 1.23\\%$)	2308	6.24
MobileViTv1-XS	4	986	2.3	74.80	1097	7.32
MobileViTv3-XS	4	927	2.5	76.7 ($\\uparrow 1.9\\%$)	1078	7.20
MobileViTv3-XS	2	853 ($\\downarrow 13.5\\%$)	2.3	76.1 ($\\uparrow 1.3\\%$)	1129	6.35
MobileViTv1-S	4	2009	5.6	78.40	822	7.34
MobileViTv3-S	4	1841	5.8	79.3 ($\\uparrow 0.9\\%$)	824	7.29
MobileViTv3-S	2	1651 ($\\downarrow 17.82\\%$)	5.2	79.06 ($\\uparrow 0.6\\%$)	876	6.60
"""


def test_paper_data_equals_the_papers_table5():
    parsed = []
    for line in PAPER_TABLE5_TEXT.splitlines():
        name, blocks, flops, params, top1, throughput, latency = line.split("\t")
        number = lambda cell: float(cell.split(" (")[0])  # noqa: E731  (drop the "(↑ x%)" notes)
        parsed.append((name, int(blocks), number(flops), number(params), number(top1),
                       number(throughput), number(latency)))
    ours = [(r.paper_name, r.blocks, r.flops_m, r.params_m, r.top1, r.throughput_img_s, r.latency_ms)
            for r in TABLE5]
    assert ours == parsed


def test_paper_rows_name_the_right_models():
    """Each row's model has the paper's layer_4 depth, params and cvnets MACs (FLOPs column)."""
    for row in TABLE5:
        cfg = mvit3.models.get_config(row.model)
        assert cfg.stages[1].num_layers == row.blocks
        assert row.paper_name.lower().replace("-", "_").startswith(
            {"v1": "mobilevitv1", "v3": "mobilevitv3"}[cfg.version])
        stats = mvit3.model_stats(row.model)
        assert abs(stats["params"] / 1e6 - row.params_m) <= 0.05, row  # printed to 2-3 digits
        assert abs(stats["macs_cvnets"] / 1e6 - row.flops_m) <= 1.0, row  # printed as integers
    names = set(mvit3.list_models())
    assert all(a in names and b in names for a, b, _ in RATIO_PAIRS)


# ---- environment -----------------------------------------------------------------------------

def test_env_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    info = bench_env.nvml_info()
    assert info == {"available": False,
                    "reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}


def test_env_when_nvml_does_not_initialise(monkeypatch):
    def fail():
        raise OSError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail))
    info = bench_env.nvml_info()
    assert not info["available"] and "NVML Shared Library Not Found" in info["reason"]


class FakeNVML(types.SimpleNamespace):
    """The part of nvidia-ml-py that env.py reads, with known answers."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self):
        super().__init__(shutdown=False)
        self.nvmlInit = lambda: None
        self.nvmlShutdown = lambda: setattr(self, "shutdown", True)
        self.nvmlDeviceGetCount = lambda: 1
        self.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
        self.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # bytes, as old releases
        self.nvmlDeviceGetUUID = lambda h: "GPU-abcd"
        self.nvmlSystemGetDriverVersion = lambda: "570.86"
        self.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
        self.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2 ** 30)
        self.nvmlDeviceGetMaxClockInfo = lambda h, clock: {1: 1980, 2: 2619}[clock]
        self.nvmlDeviceGetClockInfo = lambda h, clock: {1: 1755, 2: 2619}[clock]
        self.nvmlDeviceGetPersistenceMode = lambda h: 1
        self.nvmlDeviceGetMigMode = self.not_supported
        self.nvmlDeviceGetTemperature = lambda h, sensor: 41
        self.nvmlDeviceGetPowerUsage = lambda h: 123456
        self.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700000
        self.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x4 | 0x20 | 0x1000

    @staticmethod
    def not_supported(*args):
        raise RuntimeError("NVMLError_NotSupported")


def test_env_reads_every_nvml_field(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = bench_env.nvml_info()
    assert info["available"] and fake.shutdown
    assert (info["name"], info["uuid"], info["driver"], info["compute_capability"]) == (
        "NVIDIA H100 80GB HBM3", "GPU-abcd", "570.86", "9.0")
    assert (info["memory_total_gib"], info["max_sm_clock_mhz"], info["persistence_mode"]) == (80.0, 1980, 1)
    assert info["mig_mode"] is None and "NotSupported" in info["errors"]["mig_mode"]
    assert info["state"] == {"sm_clock_mhz": 1755, "mem_clock_mhz": 2619, "temperature_c": 41,
                             "power_w": 123.456, "power_limit_w": 700.0,
                             "throttle_reasons": ["sw_power_cap", "sw_thermal_slowdown", "0x1000"]}
    env = {**synthetic_result()["env"], "nvml": info}
    text = "\n".join(bench_env.format_env(env))
    assert "UUID GPU-abcd, driver 570.86" in text and "sw_power_cap, sw_thermal_slowdown" in text


def test_results_name_no_path_of_this_machine():
    root, home = bench_env.project_root(), Path.home()
    text = f"built at {root}/mvit3/_lib, cache {home}/.cache/x"
    assert bench_env.scrub_paths(text) == "built at <checkout>/mvit3/_lib, cache ~/.cache/x"


def test_collect_env_on_a_cpu_carries_on():
    env = bench_env.collect_env("cpu")
    assert env["device_type"] == "cpu" and env["gpu"] is None
    assert env["torch"] == torch.__version__ and env["python"]
    assert {row["backend"] for row in env["backends"]} == {"torch", "triton", "cuda"}
    assert "- no GPU" in "\n".join(bench_env.format_env(env))


# ---- timing and launches -------------------------------------------------------------------

def test_summarize_statistics():
    t = summarize([float(v) for v in range(1, 11)])
    assert (t.mean_ms, t.median_ms, t.n) == (5.5, 5.5, 10)
    assert t.p10_ms == pytest.approx(1.9) and t.p90_ms == pytest.approx(9.1)


def test_time_callable_counts_and_caps():
    calls = []
    t = time_callable(lambda: calls.append(1), "cpu", warmup=3, iters=7)
    assert t.n == 7 and len(calls) == 10
    calls.clear()
    t = time_callable(lambda: calls.append(1), "cpu", warmup=0, iters=10 ** 9, min_iters=4,
                      max_s=0.0, inner=5)  # the cap is hit at once: min_iters samples
    assert (t.n, t.inner, len(calls)) == (4, 5, 20)


def test_count_launches_skips_views_and_allocations():
    conv = torch.nn.Conv2d(3, 4, 1)

    def model(x):
        y = torch.relu(conv(x)).view(4, -1)  # 2 kernels, a view
        return torch.empty_like(y).copy_(y).t()  # an allocation, a copy kernel, a view

    count = count_launches(model, torch.randn(1, 3, 4, 4))
    assert count.by_op == {"aten::convolution": 1, "aten::relu": 1, "aten::copy_": 1}
    assert count.launches == 3 and count.cuda_kernels is None


def test_count_launches_counts_triton_launches_in_a_dry_run():
    """On a CPU, a dry run counts what the Triton backend would launch, without running it."""
    pytest.importorskip("triton", reason="Triton is not installed")
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8)

    def model(x):
        return mvit3.ops.pointwise_conv(x, w, act="silu", backend="triton").mean()

    count = count_launches(model, x, dry_run=True)
    assert count.mvit3_ops == 1 and count.by_op["mvit3_triton::pointwise_conv"] == 1
    assert count.triton_launches >= 1 and count.aten_ops == 1  # the mean
    assert count.launches == count.triton_launches + 1


def test_dry_run_host_time_runs_the_forward_without_its_kernels(monkeypatch):
    """The host time of a dry-run forward: the model's Python runs, no kernel does."""
    pytest.importorskip("triton", reason="Triton is not installed")
    from mvit3.kernels import _common

    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8)
    calls = []

    def model(x):
        calls.append(x)
        return mvit3.ops.pointwise_conv(x, w, act="silu", backend="triton")

    def no_kernel(*args, **kwargs):
        raise AssertionError("a dry run must not run a kernel")

    monkeypatch.setattr(_common.tl, "dot", no_kernel)  # what the interpreter would call
    host_ms = dry_run_host_ms(model, x, repeats=3)
    assert 0 < host_ms < 1e3 and len(calls) == 4  # one warm-up call, then the timed ones

    row = {**synthetic_result()["rows"][0], "status": "skipped", "reason": "no CUDA device",
           "launches": 52, "launch_counts": {"launches": 52, "host_ms_dry_run": 3.5}}
    result = {**synthetic_result(), "rows": [row]}
    assert "(not run: launches from a dry run; host time 3.50 ms a forward)" in render_markdown(result)


# ---- micro-benchmark cases -----------------------------------------------------------------

@pytest.mark.parametrize("model", MICRO_MODELS)
def test_micro_cases_compute_what_the_reference_modules_compute(model):
    """The stock sequence of each case (the fused ops' torch reference on folded weights)
    equals the reference model's modules: the benchmarks compare like with like. float64,
    so only summation order differs."""
    cases = build_cases(model, 1, torch.float64, "cpu")
    assert set(cases) >= {"stem", "mv2", "mlp", "fusion"}
    for kind, case in cases.items():
        assert case.flops > 0 and case.bytes > 0
        if case.module is None:
            continue
        with torch.no_grad():
            got, expected = case.fused("torch"), case.module()
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= 1e-12 * float(expected.abs().max()), kind


# ---- reports -------------------------------------------------------------------------------

def test_ratios_and_speedups_from_known_numbers():
    ratios = compute_ratios(synthetic_result())
    pair = next(p for p in ratios["pairs"] if p["comparison"] == "v3-XXS vs v1-XXS")
    assert pair["reference_latency"] == pytest.approx(6.0 / 8.0)
    assert pair["paper_latency"] == pytest.approx(7.12 / 7.24)
    assert pair["fastest_latency"] == pytest.approx(0.5 / 2.0)  # v3's CUDA graph vs v1's fast
    assert pair["reference_throughput"] == pytest.approx(8.0 / 6.0)
    l2 = next(p for p in ratios["pairs"] if p["comparison"] == "v3-XXS: 2 vs 4 layers in layer_4")
    assert l2["reference_latency"] == pytest.approx(5.0 / 6.0)
    speed = {(s["model"], s["impl"]): s for s in ratios["speedups"]}
    assert speed[("mobilevitv3_xxs", "cuda-graph")]["latency_vs_reference"] == pytest.approx(12.0)
    assert speed[("mobilevitv3_xxs", "fast")]["latency_vs_compile"] == pytest.approx(2.0)
    assert speed[("mobilevitv3_xxs_l2", "fast")]["latency_vs_compile"] is None  # no compile row
    assert {s["backend"] for s in ratios["speedups"]} == {"triton", "auto"}  # skipped rows out


def test_markdown_and_csv_of_a_stored_result():
    result = synthetic_result()
    text = render_markdown(result)
    tables = markdown_tables(text)
    for table in tables:
        assert_well_formed(table)
    assert len(tables[0]) == 2 + 9  # header, rule, the nine measured rows
    assert "NVIDIA H100 80GB HBM3" in text and "No GPU was used" not in text
    assert "FAILED mobilevitv3_xxs_l2 cuda-graph/auto: RuntimeError: capture failed on purpose" in text
    assert "skipped fast/cuda (3 models): backend cuda unavailable: not built" in text
    assert "12.00x" in text  # cuda-graph vs reference, v3-XXS
    lines = render_csv(result).splitlines()
    assert len(lines) == 1 + len(result["rows"])


# ---- roofline floors beside the times --------------------------------------------------------

def ceilings_file(tmp_path, copy_gbps=4000.0, tflops=600.0, device_name="NVIDIA H200") -> Path:
    """A ceilings file as `python -m mvit3.bench.ceilings --json` writes it on a GPU."""
    path = tmp_path / "ceilings.json"
    path.write_text(json.dumps({"device": "cuda", "device_name": device_name,
                                "copy": {"bytes": 2**31, "ms_median": 1.0, "samples": 20,
                                         "gbps": copy_gbps},
                                "matmul_fp16": {"n": 8192, "dtype": "fp16", "ms_median": 2.0,
                                                "samples": 20, "tflops": tflops}}))
    return path


def test_ceilings_come_from_a_file_a_measurement_or_the_datasheet(tmp_path):
    from mvit3.bench import floors
    from mvit3.kernel_report.gpus import GPUS

    sheet = GPUS["h200"]
    ceilings, why = floors.resolve(str(ceilings_file(tmp_path)), "NVIDIA H200")
    assert why is None and ceilings.measured and ceilings.datasheet == sheet
    gpu = ceilings.gpu  # measured bandwidth and fp16 rate; the fp32 rates stay the datasheet's
    assert (gpu.memory_gb_s, gpu.tensor_tflops) == (4000.0, 600.0)
    assert (gpu.tf32_tflops, gpu.fp32_tflops, gpu.sms) == (sheet.tf32_tflops, sheet.fp32_tflops, sheet.sms)
    assert ceilings.describe().startswith(
        "measured (ceilings.json): copy 4,000 GB/s (83% of the datasheet's), fp16 matmul 600.0 "
        "TFLOP/s (61%); TF32 494.7 and fp32 66.9 TFLOP/s from the datasheet of the NVIDIA H200 SXM")
    # gpu-report's report.json: the ceilings step's figures, the device from its env step.
    report = tmp_path / "report.json"
    record = json.loads(ceilings_file(tmp_path, 3000.0).read_text())
    report.write_text(json.dumps({"env": {"device": "NVIDIA H200"}, "ceilings": record}))
    assert floors.resolve(str(report), "NVIDIA H200")[0].gpu.memory_gb_s == 3000.0
    with pytest.raises(ValueError, match="measured on the NVIDIA H200, this device is the NVIDIA H100"):
        floors.resolve(str(report), "NVIDIA H100 80GB HBM3")
    measured = floors.resolve("measure", "NVIDIA H100 80GB HBM3", measure=lambda: record)[0]
    assert measured.source == "measured here" and measured.gpu.memory_gb_s == 3000.0
    datasheet = floors.resolve("datasheet", "NVIDIA H200")[0]
    assert datasheet.gpu == sheet and datasheet.describe().startswith("datasheet of the NVIDIA H200")

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB\nmore")

    fallback = floors.resolve("measure", "NVIDIA H200", measure=out_of_memory)[0]
    assert fallback.gpu == sheet and not fallback.measured
    assert fallback.describe().endswith(
        "(the probes failed: CUDA out of memory. Tried to allocate 1.00 GiB)")
    assert floors.resolve("measure", "NVIDIA L4", measure=None) == (
        None, "no datasheet record for the NVIDIA L4 in mvit3/kernel_report/gpus.py (its fp32 "
              "rates are needed)")
    (tmp_path / "bad.json").write_text(json.dumps({"copy": {}}))
    with pytest.raises(ValueError, match="expected copy.gbps and matmul_fp16.tflops"):
        floors.resolve(str(tmp_path / "bad.json"), "NVIDIA H200")
    with pytest.raises(ValueError, match="does not exist"):
        floors.resolve(str(tmp_path / "missing.json"), "NVIDIA H200")


def test_bench_on_a_gpu_measures_its_ceilings_or_reads_them(tmp_path, monkeypatch):
    """The command's ceilings on a CUDA device (its name faked): measured by default, read from
    --ceilings FILE, refused from another GPU's file."""
    from mvit3.bench import cli as bench_cli

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    record = json.loads(ceilings_file(tmp_path, 4100.0, 700.0).read_text())
    monkeypatch.setattr(bench_cli.ceiling_probes, "measure", lambda device: record)
    ceilings, why = bench_cli.resolve_ceilings(None, cuda)
    assert why is None and ceilings.source == "measured here" and ceilings.gpu.memory_gb_s == 4100.0
    from_file = bench_cli.resolve_ceilings(str(ceilings_file(tmp_path, 3900.0)), cuda)[0]
    assert from_file.source == "measured (ceilings.json)" and from_file.gpu.memory_gb_s == 3900.0
    assert not bench_cli.resolve_ceilings("datasheet", cuda)[0].measured
    other = ceilings_file(tmp_path, device_name="NVIDIA A100-SXM4-80GB")
    with pytest.raises(bench_cli.UsageError, match="--ceilings: ceilings file .* was measured on "
                                                   "the NVIDIA A100-SXM4-80GB"):
        bench_cli.resolve_ceilings(str(other), cuda)


def test_bench_floors_use_the_given_ceilings(tmp_path):
    """The floors of a row come from config.ceilings: with compute rates far out of reach every
    launch is memory-bound, so halving the bandwidth doubles both floors."""
    pytest.importorskip("triton", reason="Triton is not installed (the dry run records its launches)")
    from mvit3.bench import floors
    from mvit3.kernel_report.gpus import GPUS

    sheet = dataclasses.replace(GPUS["h200"], tensor_tflops=1e9, tf32_tflops=1e9, fp32_tflops=1e9)
    config = RunConfig(device=torch.device("cpu"), dtype="fp16", protocol=PROTOCOLS["quick"],
                       throughput_batch=2, backends=(), compile=False, compile_mode="default")
    facts = []
    for gb_s in (4000.0, 2000.0):
        config.ceilings = floors.Ceilings(floors.with_measured(sheet, gb_s, 1e9), "measured here", sheet)
        facts.append(runner.floor_facts("mobilevitv3_xxs", config))
    assert facts[0]["floor_reason"] is None and 0 < facts[0]["floor_ms_b1"] < facts[0]["floor_ms_batch"]
    for key in ("floor_ms_b1", "floor_ms_batch"):
        assert facts[1][key] == pytest.approx(2 * facts[0][key], rel=1e-12)
    config.ceilings, config.no_floors_reason = None, "no datasheet record for the NVIDIA L4"
    assert runner.floor_facts("mobilevitv3_xxs", config) == {
        "floor_ms_b1": None, "floor_ms_batch": None, "floor_reason": config.no_floors_reason}


def test_rows_show_the_floor_and_the_achieved_fraction_of_it(tmp_path):
    """Fake timings against fake floors: the report's arithmetic and its statement of the
    ceilings used."""
    from mvit3.bench import floors

    ceilings, _ = floors.resolve(str(ceilings_file(tmp_path)), "NVIDIA H200")
    result = synthetic_result()
    result["config"]["ceilings"] = ceilings.as_dict()
    row = next(r for r in result["rows"] if r["model"] == "mobilevitv3_xxs" and r["impl"] == "fast")
    # 1.5 ms at batch 1; 2000 / 1.5 img/s at batch 100: 75 ms a batch.
    row.update(floor_ms_b1=0.3, floor_ms_batch=15.0)
    text = render_markdown(result)
    table = markdown_tables(text)[0]
    header, cells = table[0], next(r for r in table[2:] if r[:2] == ["mobilevitv3_xxs", "fast/triton"])
    assert header[-2:] == ["floor ms (b1 / batch)", "of floor (b1 / batch)"]
    assert cells[-2:] == ["0.3 / 15", "20.0% / 20.0%"]
    reference = next(r for r in table[2:] if r[:2] == ["mobilevitv3_xxs", "reference"])
    assert reference[-2:] == ["–", "–"]  # its model's floors were not given
    assert f"at these ceilings: {ceilings.describe()}." in text
    assert floors.achieved(0.3, 1.5) == pytest.approx(0.2) and floors.achieved(None, 1.5) is None
    result["config"]["ceilings"], result["config"]["no_floors_reason"] = None, "no record"
    for r in result["rows"]:
        r.update(floor_ms_b1=None, floor_ms_batch=None)
    text = render_markdown(result)
    assert "No roofline floors: no record." in text and "of floor" not in text


def test_micro_case_floors_are_the_cases_bytes_and_flops_at_the_ceilings():
    """A case's floor, from the dry-run records of its Triton launch, against the case's own
    count of bytes and FLOPs (bench/cases.py): memory-bound on a GPU of unbounded rates,
    compute-bound (fp16 tensor rate) on one of unbounded bandwidth."""
    pytest.importorskip("triton", reason="Triton is not installed (the dry run records its launches)")
    from mvit3.bench import floors
    from mvit3.bench.test_ops_bench import floor_info
    from mvit3.kernel_report.gpus import GPUS

    sheet = GPUS["h200"]
    memory_bound = dataclasses.replace(sheet, tensor_tflops=1e9, tf32_tflops=1e9, fp32_tflops=1e9)
    compute_bound = dataclasses.replace(sheet, memory_gb_s=1e12)
    cases = build_cases("mobilevitv3_xs", 1, torch.float16, "cpu")
    for kind in ("stem", "mv2", "fusion", "mlp"):
        case = cases[kind]
        fused = lambda: case.fused("triton")  # noqa: E731
        assert floors.ops_floor_us(fused, memory_bound) == pytest.approx(
            case.bytes / (memory_bound.memory_gb_s * 1e3), rel=1e-9), kind
    fusion = cases["fusion"]  # a 1x1 conv: all its products are tensor-core dots
    assert floors.ops_floor_us(lambda: fusion.fused("triton"), compute_bound) == pytest.approx(
        fusion.flops / (sheet.tensor_tflops * 1e6), rel=1e-9)
    ceilings = floors.Ceilings(sheet, floors.DATASHEET, sheet)
    assert floor_info(fusion, ceilings, None) == {
        "floor_us": floors.ops_floor_us(lambda: fusion.fused("triton"), sheet),
        "ceilings": ceilings.describe()}
    assert floor_info(fusion, None, "no floors on a CPU") == {"floor_us": None,
                                                              "floor_reason": "no floors on a CPU"}
    with pytest.raises(ValueError, match="no Triton launch"):
        floors.ops_floor_us(lambda: fusion.fused("torch"), sheet)


def test_micro_benchmarks_close_with_their_floors():
    from mvit3.bench.conftest import floors_section

    rows = [{"name": "test_op[xs-fusion-b1-fp16-triton]", "gpu_ms_median": 0.02, "floor_us": 5.0,
             "of_floor": 0.25, "ceilings": "measured here: copy 4,000 GB/s"},
            {"name": "test_op[xs-fusion-b1-fp16-torch]", "gpu_ms_median": 0.06, "floor_us": 5.0,
             "of_floor": 5.0 / 60}]
    lines = floors_section(rows)
    assert lines[0] == "ceilings: measured here: copy 4,000 GB/s"
    assert lines[2].split() == ["test_op[xs-fusion-b1-fp16-triton]", "0.0200", "5.00", "25.0%"]
    assert lines[3].split()[-1] == "8.3%"
    assert floors_section([{"name": "a", "gpu_ms_median": 1.0, "floor_us": None,
                            "floor_reason": "no record"}])[0] == "no floors: no record"


# ---- segmentation and detection (--task seg|det) ---------------------------------------------

# The MobileViTv3 rows of the paper's Tables 3a, 3b, 4a and 4b, verbatim (tab-separated as
# extracted from the PDF).
PAPER_DENSE_TEXT = {
    "3a": "MobileViTv3-XXS\t1.96\t74.04 (+0.44%)\nMobileViTv3-0.5\t6.3\t76.48 (+1.41%)\n"
          "MobileViTv3-XS\t3.3\t78.77 (+1.60%)\nMobileViTv3-S\t7.2\t79.59 (+0.49%)\n"
          "MobileViTv3-1.0\t13.56\t80.04 (+1.10%)\n",
    "3b": "MobileViTv3-0.5\t6.37\t33.57 (+1.64%)\nMobileViTv3-0.75\t9.71\t36.43 (+1.73%)\n"
          "MobileViTv3-1.0\t13.62\t39.13 (+2.07%)\n",
    "4a": "MobileViTv3-XXS\t1.53\t19.3 (\u21910.8%)\nMobileViTv3-0.5\t2\t21.8 (\u21910.6%)\n"
          "MobileViTv3-0.75\t3.7\t25.0 (\u21910.4%)\nMobileViTv3-XS\t2.7\t25.6 (\u21912.6%)\n",
    "4b": "MobileViTv3-XS\t2.7\t25.6 (\u21910.4%)\nMobileViTv3-1.0\t5.8\t27.0 (\u21911.8%)\n"
          "MobileViTv3-S\t5.5\t27.3 (\u21912.1%)\n",
}


def test_dense_paper_data_equals_the_papers_tables_3_and_4():
    from mvit3.bench.paper import DENSE_PAPER

    parsed, printed = {}, {}
    for table, text in PAPER_DENSE_TEXT.items():
        for line in text.splitlines():
            name, params, score = line.split("\t")
            key = (table[0] if table[0] == "4" else table, name)  # 4a and 4b agree on XS
            parsed[key] = (float(params), float(score.split(" (")[0]))
            printed[key] = params
    rows = {(r.table, r.paper_name): r for r in DENSE_PAPER}
    assert {key: (r.params_m, r.score) for key, r in rows.items()} == parsed
    for key, row in rows.items():  # the model each row names has the paper's count, as printed
        decimals = len(printed[key].partition(".")[2])
        params_m = mvit3.model_stats(row.model, 64)["params_eval"] / 1e6
        assert abs(params_m - row.params_m) <= 0.5 * 10.0 ** -decimals, row


def quick_cpu_bench(tmp_path, capsys, *argv) -> tuple:
    """(markdown, JSON result) of a quick `python -m mvit3 bench` run on the CPU that succeeded."""
    path = tmp_path / "result.json"
    rc = main(["bench", "--quick", "--device", "cpu", "--no-progress", "--json", str(path), *argv])
    out = capsys.readouterr().out
    assert rc == 0
    for table in markdown_tables(out):
        assert_well_formed(table)
    return out, json.loads(path.read_text())


def test_det_task_on_one_small_model(tmp_path, capsys):
    out, result = quick_cpu_bench(tmp_path, capsys, "--task", "det", "--models",
                                  "ssdlite_mobilevitv3_xxs_coco", "--throughput-batch", "1",
                                  "--backends", "torch")
    assert out.startswith("## SSDLite detection on CPU") and "(fp32, 320x320)" in out
    assert "paper ms" not in out and "gives these models' parameters and accuracy only" in out
    assert result["config"]["task"] == "det" and result["config"]["img_size"] == 320
    rows = {(r["impl"], r["backend"]): r for r in result["rows"]}
    reference = rows[("reference", "eager")]
    assert reference["status"] == "ok" and reference["max_rel_err"] == 0  # (scores, boxes) flattened
    assert reference["params_eval"] == 1_533_450 and reference["paper_params_m"] == 1.53
    assert (reference["paper_metric"], reference["paper_score"]) == ("COCO mAP (%)", 19.3)
    assert reference["macs_cvnets"] == mvit3.model_stats("ssdlite_mobilevitv3_xxs_coco", 320)["macs_cvnets"]
    fast = rows[("fast", "torch")]
    if fast["status"] == "ok":  # mvit3.fast builds the dense models
        assert fast["max_rel_err"] < 1e-5
    else:  # not yet: the row says why instead of failing the run
        assert fast["status"] == "skipped", fast["reason"]
        assert fast["reason"].startswith("mvit3.fast.create_model does not take ssdlite_mobilevitv3_xxs_coco")


def test_seg_task_at_a_smaller_size(tmp_path, capsys):
    out, result = quick_cpu_bench(tmp_path, capsys, "--task", "seg", "--models",
                                  "deeplabv3_mobilevitv3_050_ade20k", "--img-size", "64",
                                  "--impls", "reference")
    assert out.startswith("## DeepLabv3 segmentation on CPU")
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["throughput_batch"] == 2  # a quick CPU run's batch
    stats = mvit3.model_stats("deeplabv3_mobilevitv3_050_ade20k", 64)
    assert (row["params"], row["params_eval"], row["macs"]) == (6_608_677, 6_367_887, stats["macs"])
    facts = markdown_tables(out)[1]
    assert facts[0][2] == "params without the aux head (the paper's count)"
    assert facts[2][:4] == ["deeplabv3_mobilevitv3_050_ade20k", "6,608,677", "6,367,887", "6.37"]
    assert facts[2][-1] == "33.57 (ADE20K mIOU (%))"


def test_dense_models_by_task():
    from mvit3.bench.cli import resolve_models

    assert resolve_models(None, "seg") == mvit3.list_models("deeplabv3*") and len(mvit3.list_models("deeplabv3*")) == 9
    assert resolve_models(None, "det") == mvit3.list_models("ssdlite*")
    assert resolve_models(None, "cls") == list(TABLE5_MODELS)
    assert resolve_models("ssdlite_mobilevitv3_x*", "det") == ["ssdlite_mobilevitv3_xxs_coco",
                                                                "ssdlite_mobilevitv3_xs_coco"]
    assert runner.flat_output((torch.ones(1, 2, 3), torch.zeros(1, 2))).shape == (8,)


@pytest.mark.parametrize("argv, message", [
    (["--task", "seg", "--models", "mobilevitv3_xs"], "--task seg does not take mobilevitv3_xs"),
    (["--task", "det", "--models", "table5"], "--models table5 is the classification table"),
    (["--task", "det", "--paper-protocol"], "the paper times no SSDLite detection model"),
    (["--img-size", "128"], "--img-size applies to --task seg|det"),
    (["--task", "seg", "--img-size", "16"], "--img-size must be at least 32"),
    (["--task", "seg", "--img-size", "100", "--models", "deeplabv3_mobilevitv3_050_ade20k"],
     "deeplabv3_mobilevitv3_050_ade20k takes multiples of its output stride 8 (e.g. 96)"),
    (["--device", "cpu", "--ceilings", "datasheet"], "the floors are a GPU's"),
])
def test_dense_and_ceilings_arguments_are_checked_before_running(argv, message, capsys):
    assert main(["bench", "--no-progress"] + argv) == 2
    assert message in capsys.readouterr().err
