"""train.dtype=auto on CPUs with native bf16 (train/dtype_probe.py): the choice follows measured step times with a
margin for fp32, is cached per machine and shape, never probes for explicit dtypes or CPUs without native bf16,
stays within its time bounds, and leaves the caller's RNG alone."""
import dataclasses
import json

import pytest
import torch

import train.dtype_probe as dp
import train.runtime as runtime
from model.config import FFNConfig, MiniMindConfig
from train.runtime import Runtime, auto_dtype_choice, resolve_dtype, settle_auto_dtype

TINY = MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_seq_len=16)
TINY_MOE = dataclasses.replace(TINY, ffn=FFNConfig(type="moe", n_experts=4, top_k=2))


pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest.py: the project cache in a temporary directory


@pytest.fixture
def fake_times(monkeypatch):
    """Replace the measurement by a queue of StepTimes; records every call (a call with an empty queue fails)."""
    queue, calls = [], []

    def measure(model_cfg, micro_batch_size):
        calls.append((model_cfg, micro_batch_size))
        if not queue:
            raise AssertionError("measured although it should not have")
        return queue.pop(0)
    monkeypatch.setattr(dp, "measure_step_times", measure)
    return queue, calls


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "fast_bf16_cpu", lambda: True)


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [
    (0.100, 0.070, "bf16"),  # bf16 30% faster
    (0.100, 0.090, "bf16"),  # exactly the 10% margin
    (0.100, 0.095, "fp32"),  # 5% faster: within the margin, fp32 (exact) wins the tie
    (0.100, 0.100, "fp32"),
    (0.100, 0.180, "fp32"),  # slower
])
def test_the_choice_follows_the_measured_times(fake_times, native_bf16, fp32_s, bf16_s, expected):
    queue, calls = fake_times
    queue.append(dp.StepTimes(fp32_s, bf16_s))
    choice = auto_dtype_choice("auto", "cpu", TINY, 4)
    assert (choice.dtype, choice.source, len(calls)) == (expected, "measured", 1)
    assert choice.fp32_ms == pytest.approx(fp32_s * 1e3) and choice.bf16_ms == pytest.approx(bf16_s * 1e3)


def test_the_cache_is_written_keyed_by_shape_and_reused_without_measuring(fake_times, native_bf16, cache_dir):
    queue, calls = fake_times
    queue.append(dp.StepTimes(0.100, 0.060))
    assert auto_dtype_choice("auto", "cpu", TINY, 4).dtype == "bf16"
    doc = json.loads((cache_dir / "dtype.json").read_text())
    (key, entry), = doc["choices"].items()
    assert doc["format"] == 1 and entry["dtype"] == "bf16" and entry["fp32_ms"] == pytest.approx(100)
    assert entry["shape"] == dp.shape_key(TINY, 4) and entry["contended"] is False
    assert f"threads={torch.get_num_threads()}" in key
    assert torch.__version__ in key and not [p.name for p in cache_dir.iterdir() if ".tmp" in p.name]

    again = auto_dtype_choice("auto", "cpu", TINY, 4)  # the queue is empty: a measurement would fail the test
    assert (again.dtype, again.source, len(calls)) == ("bf16", "cached", 1)
    assert again.line().startswith("dtype auto -> bf16 (measured earlier: fp32 100 ms/step, bf16 60 ms/step")

    # another shape (micro-batch, vocab, FFN) measures again; settings that do not change the cost do not
    for other in ((TINY, 8), (dataclasses.replace(TINY, vocab_size=128), 4), (TINY_MOE, 4)):
        queue.append(dp.StepTimes(0.100, 0.200))
        assert auto_dtype_choice("auto", "cpu", *other).source == "measured"
    assert len(calls) == 4 and len(json.loads((cache_dir / "dtype.json").read_text())["choices"]) == 4
    assert auto_dtype_choice("auto", "cpu", dataclasses.replace(TINY, rope_theta=1e4), 4).source == "cached"


def test_a_contended_answer_is_cached_and_says_so(fake_times, native_bf16, cache_dir):
    queue, calls = fake_times
    queue += [dp.StepTimes(0.1, 0.05, contended=True)]
    busy = auto_dtype_choice("auto", "cpu", TINY, 4)
    assert (busy.dtype, busy.source) == ("bf16", "measured") and "busy machine" in busy.line()
    assert "delete the entry to measure again" in busy.line()
    assert auto_dtype_choice("auto", "cpu", TINY, 4).source == "cached" and len(calls) == 1  # not measured again
    entry, = json.loads((cache_dir / "dtype.json").read_text())["choices"].values()
    assert entry["dtype"] == "bf16" and entry["contended"] is True


def test_explicit_dtypes_never_probe(fake_times, native_bf16):
    queue, calls = fake_times
    for dtype in ("fp32", "bf16"):
        assert auto_dtype_choice(dtype, "cpu", TINY, 4).dtype == dtype
        rt = Runtime(device=torch.device("cpu"), dtype=dtype, dtype_requested=dtype)
        assert settle_auto_dtype(rt, TINY, 4) is None and rt.dtype == dtype
    assert auto_dtype_choice("fp16", "cuda", TINY, 4).dtype == "fp16"
    assert calls == []


def test_a_cpu_without_native_bf16_gets_fp32_without_probing(fake_times, monkeypatch):
    monkeypatch.setattr(runtime, "fast_bf16_cpu", lambda: False)
    rt = Runtime(device=torch.device("cpu"), dtype="fp32", dtype_requested="auto")
    line = settle_auto_dtype(rt, TINY, 4)
    assert rt.dtype == "fp32" and line.startswith("dtype auto -> fp32 (this CPU has no native bf16")
    assert resolve_dtype("auto", "cpu") == auto_dtype_choice("auto", "cpu", TINY, 4).dtype == "fp32"
    assert fake_times[1] == []


def test_settle_sets_the_runtime_dtype_and_says_why(fake_times, native_bf16, cache_dir):
    fake_times[0].append(dp.StepTimes(0.134, 0.180))
    rt = Runtime(device=torch.device("cpu"), dtype="bf16", dtype_requested="auto")  # the ISA rule's guess
    line = settle_auto_dtype(rt, TINY, 4)
    assert rt.dtype == "fp32" and rt.amp_dtype is None
    assert line.startswith("dtype auto -> fp32 (measured: fp32 134 ms/step, bf16 180 ms/step; ")
    assert str(cache_dir / "dtype.json") in line or "~/" in line


def test_a_failed_probe_falls_back_to_the_isa_rule_and_is_not_cached(monkeypatch, native_bf16, cache_dir):
    def broken(model_cfg, micro_batch_size):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(dp, "measure_step_times", broken)
    choice = auto_dtype_choice("auto", "cpu", TINY, 4)
    assert (choice.dtype, choice.source) == ("bf16", "failed") and "out of memory" in choice.line()
    assert not (cache_dir / "dtype.json").exists()


def test_a_corrupt_cache_is_ignored_and_rewritten(fake_times, cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / "dtype.json").write_text("{not json")
    fake_times[0].append(dp.StepTimes(0.1, 0.2))
    assert dp.probe_dtype(TINY, 4).source == "measured"
    assert json.loads((cache_dir / "dtype.json").read_text())["format"] == 1


class FakeSteps:
    """Replaces the timed model step: each takes `seconds[dtype]` on a fake clock (the first one of each dtype, the
    cold one, `cold_s` if given); records the steps run."""

    def __init__(self, monkeypatch, fp32_s: float, bf16_s: float, cold_s: float = 0.0):
        self.t, self.seconds, self.cold_s, self.steps = 0.0, {"fp32": fp32_s, "bf16": bf16_s}, cold_s, []
        monkeypatch.setattr(dp, "_timed_step", self.step)

    def step(self, model, x_BT, y_BT, dtype, clock) -> float:
        seconds = self.cold_s if self.cold_s and dtype not in self.steps else self.seconds[dtype]
        self.steps.append(dtype)
        self.t += seconds
        return seconds

    def clock(self) -> float:
        return self.t


def test_rounds_alternate_the_order_and_the_best_timed_step_counts(monkeypatch):
    fake = FakeSteps(monkeypatch, fp32_s=0.1, bf16_s=0.05, cold_s=8.0)  # a slow cold start is not timed
    times = dp.measure_step_times(TINY_MOE, 2, clock=fake.clock)  # MoE: the longer warm-up
    assert fake.steps[:4] == ["fp32", "bf16", "bf16", "fp32"]
    assert len(fake.steps) == 2 * (dp.PROBE_WARMUP_MOE + dp.PROBE_TIMED)
    assert (times.fp32_s, times.bf16_s, times.ended) == (0.1, 0.05, "measured")
    dense = FakeSteps(monkeypatch, fp32_s=0.1, bf16_s=0.05)
    dp.measure_step_times(TINY, 2, clock=dense.clock)  # dense: the shorter warm-up
    assert len(dense.steps) == 2 * (dp.PROBE_WARMUP_DENSE + dp.PROBE_TIMED)


def test_a_huge_first_fp32_step_stops_the_probe_and_picks_bf16(monkeypatch):
    fake = FakeSteps(monkeypatch, fp32_s=25.0, bf16_s=5.0)  # over PROBE_HUGE_S
    times = dp.measure_step_times(TINY, 2, clock=fake.clock)
    assert (times.fp32_s, times.bf16_s, times.ended) == (25.0, None, "huge")
    assert fake.steps == ["fp32"] and dp.choose(times) == "bf16"  # one fp32 step, bf16 never run


def test_a_slow_warm_fp32_step_ends_the_probe_after_one_warm_pair(monkeypatch):
    fake = FakeSteps(monkeypatch, fp32_s=3.0, bf16_s=1.0)  # over PROBE_STEP_LIMIT_S, under PROBE_HUGE_S
    times = dp.measure_step_times(TINY_MOE, 2, clock=fake.clock)
    assert (times.fp32_s, times.bf16_s, times.ended) == (3.0, 1.0, "short")
    assert len(fake.steps) == 4 and dp.choose(times) == "bf16"  # the cold round and one warm round


def test_the_budget_bounds_the_probe(monkeypatch):
    fake = FakeSteps(monkeypatch, fp32_s=1.5, bf16_s=1.8)  # each under the step limit, the rounds over a 4 s budget
    times = dp.measure_step_times(TINY_MOE, 2, budget_s=4.0, clock=fake.clock)
    assert (times.fp32_s, times.bf16_s, times.ended) == (1.5, 1.8, "budget")
    assert len(fake.steps) == 4  # two rounds: the second crossed the budget
    assert dp.choose(times) == "fp32"


def test_the_probe_leaves_the_rng_and_no_gradients_behind():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    times = dp.measure_step_times(TINY_MOE, 2, warmup=1, timed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert times.fp32_s > 0 and times.bf16_s > 0  # measured (or short / budget on a very busy machine)


class QuietLoad:
    """No other process on our cores: the real probe below is cached as settled even on a busy test machine."""

    def cores(self) -> float:
        return 0.0


def test_a_real_probe_on_a_tiny_model_picks_a_dtype_and_caches_it(cache_dir, monkeypatch):
    monkeypatch.setattr(dp, "_OtherLoad", QuietLoad)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    choice = dp.probe_dtype(TINY, 2)
    assert choice.dtype in ("bf16", "fp32") and choice.source == "measured"
    assert choice.fp32_ms > 0 and choice.bf16_ms > 0
    assert torch.equal(torch.get_rng_state(), before)
    entry, = json.loads((cache_dir / "dtype.json").read_text())["choices"].values()
    assert entry["dtype"] == choice.dtype and dp.probe_dtype(TINY, 2).source == "cached"
