"""The matmul peak (train/hardware.py): best-of-k timing, the per-machine cache (used, keyed, corrupt files ignored,
contended measurements re-measured and upgraded), and the trainer's wrapper."""
import json
import math

import pytest
import torch

import train.hardware as hw
from train.runtime import Runtime, measure_peak_flops

SHAPE = (64, 64, 64)
FLOPS = 2 * 64 ** 3


pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest.py: the project cache in a temporary directory


@pytest.fixture
def fake_measure(monkeypatch):
    """Replace the timed measurement by a queue of (FLOP/s, contended) results; records how often it ran."""
    results, calls = [], []

    def measure(device, dtype, shape, budget_s):
        calls.append((device.type, dtype, shape))
        return results.pop(0)
    monkeypatch.setattr(hw, "_measure", measure)
    return results, calls


def test_time_best_is_the_best_sample_not_the_mean(monkeypatch):
    durations, clock = [0.5, 0.1, 0.3, 0.2], {"t": 0.0, "calls": 0}

    def fn():  # a call that takes the next of `durations` on a fake clock
        clock["t"] += durations[clock["calls"]]
        clock["calls"] += 1
    monkeypatch.setattr(hw.time, "perf_counter", lambda: clock["t"])
    assert hw.time_best(fn, "cpu", repeats=4) == pytest.approx(0.1)
    assert clock["calls"] == 4


def test_time_best_runs_until_the_budget_and_batches_short_calls(monkeypatch):
    clock = {"t": 0.0}
    calls = []

    def fn():
        calls.append(1)
        clock["t"] += 1e-4  # 0.1 ms per call: too short for one sample of >= 1 ms
    monkeypatch.setattr(hw.time, "perf_counter", lambda: clock["t"])
    assert hw.time_best(fn, "cpu", repeats=2, budget_s=0.05, sample_s=1e-3) == pytest.approx(1e-4)
    assert clock["t"] >= 0.05 and len(calls) > 20  # kept sampling until the budget, several calls per sample


def test_peak_is_cached_and_the_second_call_does_not_measure(fake_measure, cache_dir):
    results, calls = fake_measure
    results += [(1e12, False)]
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 1e12
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 1e12
    assert len(calls) == 1
    doc = json.loads((cache_dir / "peak.json").read_text())
    (key, entry), = doc["peaks"].items()
    assert entry["flops"] == 1e12 and not entry["contended"]
    assert "|bf16|" in key and f"threads={torch.get_num_threads()}" in key and torch.__version__ in key
    assert hw.device_name("cpu") in key and "64x64x64" in key
    assert not [p.name for p in cache_dir.iterdir() if ".tmp" in p.name]


def test_cache_key_separates_dtype_threads_and_shape(fake_measure):
    results, calls = fake_measure
    results += [(1e12, False), (2e12, False), (3e12, False), (4e12, False)]
    threads = torch.get_num_threads()
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 1e12
    assert hw.matmul_peak_flops("cpu", "fp32", shape=SHAPE) == 2e12
    assert hw.matmul_peak_flops("cpu", "bf16", num_threads=threads + 1, shape=SHAPE) == 3e12
    assert torch.get_num_threads() == threads  # the thread count applied to the measurement only
    assert hw.matmul_peak_flops("cpu", "bf16", shape=(32, 64, 64)) == 4e12
    assert hw.matmul_peak_flops("cpu", "fp32", shape=SHAPE) == 2e12
    assert len(calls) == 4


def test_disabled_cache_measures_every_time_and_writes_nothing(fake_measure, cache_dir):
    results, calls = fake_measure
    results += [(1e12, False), (2e12, False)]
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE, cache=False) == 1e12
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE, cache=False) == 2e12
    assert not (cache_dir / "peak.json").exists()


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 1, "peaks": []}', '{"format": 99, "peaks": {}}',
                                     "\0\0\0"])
def test_a_corrupt_cache_is_ignored_and_rewritten(fake_measure, cache_dir, content):
    results, calls = fake_measure
    results += [(1e12, False)]
    cache_dir.mkdir(parents=True)
    (cache_dir / "peak.json").write_text(content)
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 1e12
    assert json.loads((cache_dir / "peak.json").read_text())["format"] == 1
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 1e12 and len(calls) == 1


def test_a_corrupt_entry_is_measured_again(fake_measure, cache_dir):
    results, calls = fake_measure
    results += [(1e12, False), (5e11, False)]
    hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE)
    doc = json.loads((cache_dir / "peak.json").read_text())
    key = next(iter(doc["peaks"]))
    doc["peaks"][key]["flops"] = "fast"
    (cache_dir / "peak.json").write_text(json.dumps(doc))
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 5e11 and len(calls) == 2


def test_contended_measurements_are_redone_keeping_the_best_until_a_quiet_one(fake_measure, cache_dir):
    results, calls = fake_measure
    results += [(3e11, True), (9e11, True), (6e11, True), (5e11, False)]
    seen = [hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) for _ in range(6)]
    assert seen == [3e11, 9e11, 9e11, 9e11, 9e11, 9e11]  # never lower than before; settled by the quiet one
    assert len(calls) == 4
    entry, = json.loads((cache_dir / "peak.json").read_text())["peaks"].values()
    assert entry["flops"] == 9e11 and not entry["contended"] and entry["measurements"] == 4


def test_unwritable_cache_dir_still_returns_a_peak(fake_measure, tmp_path, monkeypatch):
    results, calls = fake_measure
    results += [(1e12, False), (1e12, False)]
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MINIMIND_CACHE_DIR", str(blocker / "cache"))  # a path under a regular file
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 1e12
    assert hw.matmul_peak_flops("cpu", "bf16", shape=SHAPE) == 1e12 and len(calls) == 2


def test_refuses_an_unresolved_dtype():
    with pytest.raises(ValueError, match="auto"):
        hw.matmul_peak_flops("cpu", "auto", cache=False)


def test_real_measurement_is_plausible_and_the_trainer_wrapper_uses_the_cache(cache_dir):
    rate = hw.matmul_peak_flops("cpu", "fp32", shape=SHAPE, cache=False, budget_s=0.02)
    assert math.isfinite(rate) and 1e6 < rate < 1e15
    rt = Runtime(device=torch.device("cpu"), dtype="fp32")
    first = measure_peak_flops(rt)  # square 1024 fp32, ~1 s
    assert (cache_dir / "peak.json").exists()
    entry, = json.loads((cache_dir / "peak.json").read_text())["peaks"].values()
    assert first == entry["flops"] and 1e8 < first < 1e15
    if not entry["contended"]:
        assert measure_peak_flops(rt) == first


def test_cpu_info_names_the_model_and_matmul_isa(monkeypatch):
    for var in hw.ISA_CAP_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hw, "_cpuinfo", lambda: ("Some CPU", frozenset({"avx2", "avx512f", "avx512_bf16"})))
    assert hw.cpu_info() == {"model": "Some CPU", "isa": "AVX-512-BF16", "isa_cap": None}
    monkeypatch.setattr(hw, "_cpuinfo", lambda: ("Some CPU", frozenset({"avx2", "amx_tile", "amx_bf16"})))
    assert hw.cpu_info()["isa"] == "AMX" and hw.device_name("cpu") == "Some CPU [AMX]"
    monkeypatch.setattr(hw, "_cpuinfo", lambda: ("Old CPU", frozenset({"sse4_2", "avx2"})))
    assert hw.cpu_info()["isa"] == "AVX2"


def test_an_onednn_isa_cap_hides_the_matmul_instructions_above_it(monkeypatch):
    """ONEDNN_MAX_CPU_ISA makes an AMX CPU's bf16 matmuls run as without AMX: the ISA reported, the bf16 rule of
    dtype auto and the peak cache's key follow the cap, not /proc/cpuinfo alone."""
    from train.runtime import fast_bf16_cpu
    monkeypatch.setattr(hw, "_cpuinfo", lambda: ("Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile",
                                                                    "amx_bf16"})))
    for var in hw.ISA_CAP_VARS:
        monkeypatch.delenv(var, raising=False)
    uncapped = hw.device_name("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert hw.cpu_info() == {"model": "Xeon", "isa": "AVX-512-BF16, oneDNN cap AVX512_CORE_BF16",
                             "isa_cap": "AVX512_CORE_BF16"}
    assert "amx_tile" not in hw.cpu_flags() and fast_bf16_cpu() and hw.device_name("cpu") != uncapped
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hw.cpu_info()["isa"].startswith("AVX2,") and not fast_bf16_cpu()
    for value in ("AVX512_CORE_AMX", "ALL", "no-such-isa"):  # nothing hidden
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
        assert hw.cpu_info()["isa"] == "AMX" and hw.isa_cap() is None
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")  # oneDNN's older name for the same variable
    assert hw.cpu_info()["isa"] == "AVX-512, oneDNN cap AVX512_CORE"


def test_bench_table_names_the_cpu_and_its_matmul_isa():
    import importlib.util
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    spec = importlib.util.spec_from_file_location("bench_script", scripts / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"variant": "swiglu", "tokens_per_s": 1000.0, "mfu": 0.5, "tokens_per_s_vs_baseline": 1.0,
           "step_ms_median": 10.0, "step_ms_p25": 9.0, "step_ms_p75": 11.0, "forward_ms_median": 3.0,
           "backward_ms_median": 6.0, "optimizer_ms_median": 1.0, "peak_mem_bytes": 2 ** 20,
           "peak_matmul_flops": 4e11, "peak_matmul_shape": [4096, 512, 1408, "forward"], "device": "cpu",
           "dtype": "bf16", "threads": 2, "torch": "2.x", "steps": 3, "warmup": 1, "peak_mem_source": "rss",
           "cpu": "Some Xeon", "cpu_isa": "AMX", "machine_peak_flops": 8e11, "train_mfu": 0.25,
           "mfu_paired": 0.625, "minor_faults_per_step": 12.5,
           "breakdown": {"matmul_frac": 0.5, "attention_frac": 0.3, "other_frac": 0.2, "profiled_ms": 12.0,
                         "profiled_steps": 3, "method": "op clock", "minor_faults_per_step": 40000.0}}
    lines = module.format_table([row]).splitlines()
    assert lines[-1].startswith("CPU Some Xeon (matmul ISA AMX)") and "800.0 GFLOP/s" in lines[-1]
    assert "swiglu 25.0%" in lines[-1]
    assert lines[-2].startswith("minor page faults per step") and lines[-2].endswith("swiglu 12 / 40,000")
    assert lines[-3].startswith("breakdown of 3 more step(s) per variant")
    assert "swiglu matmul 50% / attention 30% / everything else 20% of 12 ms per step (op clock)" in lines[-3]
    assert lines[2].split()[2:4] == ["50.0%", "62.5%"]  # MFU against the run's best peak, then the paired one


def test_step_breakdown_sorts_operators_into_matmul_attention_and_the_rest():
    from types import SimpleNamespace

    from train.step_profile import step_breakdown

    def op(name, us, parent=None, device_type="DeviceType.CPU"):
        return SimpleNamespace(name=name, self_cpu_time_total=us, self_device_time_total=us / 10, cpu_parent=parent,
                               device_type=device_type)

    attn_bwd = op("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 120.0)
    to_copy = op("aten::_to_copy", 0.0)
    events = [op("aten::mm", 300.0), op("aten::_grouped_mm", 100.0), op("aten::addmm", 100.0),
              op("aten::_scaled_dot_product_flash_attention_for_cpu", 50.0), attn_bwd,
              op("aten::fill_", 20.0, parent=attn_bwd),  # called by the attention op: attention's time
              op("aten::copy_", 10.0, parent=op("aten::zeros", 0.0, parent=attn_bwd)),  # two levels down
              op("aten::mul", 200.0), to_copy, op("aten::copy_", 100.0, parent=to_copy)]  # a cast: everything else
    b = step_breakdown(events)
    assert (b["matmul_ms"], b["attention_ms"], b["other_ms"], b["profiled_ms"]) == (0.5, 0.2, 0.3, 1.0)
    assert (b["matmul_frac"], b["attention_frac"], b["other_frac"]) == (0.5, 0.2, 0.3)
    assert step_breakdown(events, "cuda")["profiled_ms"] == 0.1  # device time on CUDA
    # on CUDA the kernels are events of their own whose time is already in the operator that launched them
    kernel = op("ampere_bf16_gemm", 999.0, device_type="DeviceType.CUDA")
    assert step_breakdown(events + [kernel], "cuda") == step_breakdown(events, "cuda")
    over_two = step_breakdown(events + events, steps=2)  # two profiled steps: per-step times, the same shares
    assert (over_two["matmul_ms"], over_two["profiled_ms"], over_two["profiled_steps"]) == (0.5, 1.0, 2)
    assert over_two["other_frac"] == b["other_frac"]


def test_op_clock_breakdown_times_top_level_aten_calls():
    """time_ops sorts each top-level ATen call's wall time into matmul / attention / other, per step; nested calls
    (inside SDPA) count as the caller's. Checked against a step whose matmul work dwarfs its elementwise work."""
    import torch
    import torch.nn.functional as F
    from train.step_profile import time_ops

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    q = torch.randn(1, 2, 64, 16)

    def step():
        for _ in range(20):
            torch.mm(a, b)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        a.add(1.0)

    out = time_ops(step, steps=2)
    assert out["method"] == "op clock" and out["profiled_steps"] == 2
    assert out["matmul_ms"] > 0 and out["attention_ms"] > 0 and out["other_ms"] > 0
    assert abs(out["matmul_frac"] + out["attention_frac"] + out["other_frac"] - 1) < 1e-9
    assert out["matmul_ms"] > out["other_ms"]  # 20 matmuls of 256^3 against one 256^2 add
    assert abs(out["profiled_ms"] - (out["matmul_ms"] + out["attention_ms"] + out["other_ms"])) < 1e-9
