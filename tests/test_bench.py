"""scripts/bench.py end to end on the CI-sized model (correctness of the output, never timing)."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_bench_json_on_tiny_variants(tmp_path):
    bench = tmp_path / "tiny-bench.yaml"
    bench.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\n"
                     "overrides: {model.max_seq_len: 32, train.micro_batch_size: 4}\n"
                     "baseline: swiglu\n"
                     "variants:\n"
                     "  swiglu: {model.ffn.type: glu}\n"
                     "  moe4x2: {model.ffn.type: moe, model.ffn.n_experts: 4, model.ffn.top_k: 2}\n")
    proc = _bench(tmp_path, "--config", str(bench), "--steps", "2", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["swiglu", "moe4x2"]
    for r in rows:
        for key in ("tokens_per_s", "mfu", "peak_matmul_flops", "step_ms_median", "forward_ms_median",
                    "backward_ms_median", "optimizer_ms_median"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["peak_mem_bytes"] >= 0 and r["steps"] == 2 and r["tokens_per_step"] == 4 * 32
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        # tokens/s and MFU are consistent with the step time, FLOPs/token and the measured peak
        assert math.isclose(r["tokens_per_s"], r["tokens_per_step"] / (r["step_ms_median"] / 1e3), rel_tol=1e-9)
        assert math.isclose(r["mfu"], r["flops_per_token"] * r["tokens_per_s"] / r["peak_matmul_flops"],
                            rel_tol=1e-9)
        assert r["dtype"] == "fp32" and r["device"] == "cpu"  # tiny.yaml's settings, not the bench's
    assert rows[0]["tokens_per_s_vs_baseline"] == 1.0
    assert rows[1]["params_total"] > rows[1]["params_active"]  # the MoE really has more weights than it uses


def test_bench_plain_config_and_bad_variant(tmp_path):
    tiny = str(ROOT / "configs" / "tiny.yaml")
    proc = _bench(tmp_path, "--config", tiny, "--steps", "1", "--warmup", "0", "model.max_seq_len=16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2].startswith("glu-silu")  # table: header, rule, the one variant
    bad = _bench(tmp_path, "--config", tiny, "--variants", "nope")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --variants: unknown nope; valid: glu-silu"]
