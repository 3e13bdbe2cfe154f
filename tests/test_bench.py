"""scripts/bench.py end to end on the CI-sized model: the output against hand counts and bounds that do not depend on
how fast the machine is (never a timing threshold)."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


V, D, L, H, G, T = 512, 64, 2, 4, 2, 32  # configs/tiny.yaml's model (vocab: its tokenizer size) at seq_len 32
C = D // H


def by_hand(ffn_per_layer: int, ffn_active_per_layer: int) -> dict:
    """Parameters and training FLOPs/token (6·N_active + 12·L·D·T) of the tiny model, from its layer shapes."""
    common = V * D + L * (D * H * C + 2 * D * G * C + H * C * D) + L * D + D + L * D  # tied emb, q/k/v/o, 2L+1 norms
    total, active = common + L * ffn_per_layer, common + L * ffn_active_per_layer
    return dict(params_total=total, params_active=active, flops_per_token=6 * active + 12 * L * D * T)


GLU = 3 * D * round(8 * D * D / (3 * D))  # gate, up, down at the width that matches a dense 4·d FFN (171)
EXPERT = 3 * D * round((8 * D * D - D * 4) / 2 / (3 * D))  # 4 experts top-2: (budget - router) / 2 active (85)
WANT = {"swiglu": by_hand(GLU, GLU), "moe4x2": by_hand(D * 4 + 4 * EXPERT, D * 4 + 2 * EXPERT)}


def test_bench_json_on_tiny_variants(tmp_path):
    bench = tmp_path / "tiny-bench.yaml"
    bench.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\n"
                     "overrides: {model.max_seq_len: 32, train.micro_batch_size: 4}\n"
                     "baseline: swiglu\n"
                     "variants:\n"
                     "  swiglu: {model.ffn.type: glu}\n"
                     "  moe4x2: {model.ffn.type: moe, model.ffn.n_experts: 4, model.ffn.top_k: 2}\n")
    start = time.perf_counter()
    proc = _bench(tmp_path, "--config", str(bench), "--steps", "2", "--warmup", "1", "--json")
    wall = time.perf_counter() - start  # a clock of our own around the whole process
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["swiglu", "moe4x2"]
    for r in rows:
        for key in ("tokens_per_s", "mfu", "peak_matmul_flops", "step_ms_median", "forward_ms_median",
                    "backward_ms_median", "optimizer_ms_median"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["peak_mem_bytes"] >= 0 and r["steps"] == 2 and r["tokens_per_step"] == 4 * 32
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        # parameter counts and FLOPs/token against the layer shapes, counted by hand
        want = WANT[r["variant"]]
        assert {k: r[k] for k in want} == want, r["variant"]
        # tokens/s against our own clock: the timed steps it implies fit inside the process's wall time (a unit or
        # scale error of 1000x would not)
        assert 0 < r["steps"] * r["tokens_per_step"] / r["tokens_per_s"] < wall
        assert r["step_ms_max"] / 1e3 < wall
        # MFU is a fraction of the machine's measured matmul peak: a tiny model cannot reach it
        assert 0 < r["mfu"] <= 1, r["mfu"]
        # the paired MFU divides each round's step by that round's own peak pass, never above the run's best: it
        # can only be at least the best-of MFU (Jensen for the 2-step mean), and still a fraction
        assert r["mfu"] * (1 - 1e-9) <= r["mfu_paired"] <= 1, (r["mfu"], r["mfu_paired"])
        assert r["dtype"] == "fp32" and r["device"] == "cpu"  # tiny.yaml's settings, not the bench's
        # page faults per step, timed and profiled: counts, so whole numbers over the steps, never negative
        assert r["minor_faults_per_step"] * r["steps"] == int(r["minor_faults_per_step"] * r["steps"]) >= 0
        b = r["breakdown"]
        profiled = b["minor_faults_per_step"] * b["profiled_steps"]
        assert profiled == int(profiled) >= 0
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


def test_minor_faults_counts_first_touches_of_fresh_memory():
    import mmap
    from train.step_profile import minor_faults

    size = 64 << 20
    region = mmap.mmap(-1, size)  # fresh anonymous memory: no page is backed until written
    before = minor_faults()
    for offset in range(0, size, 4096):
        region[offset] = 1
    touched = minor_faults() - before
    region.close()
    assert touched >= size // (2 << 20)  # at least one fault per 2 MB (transparent huge pages), else per 4 KB page
