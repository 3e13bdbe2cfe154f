"""train.parallel=fsdp: FSDP2 (`fully_shard`) under torchrun, on CPU with gloo and two processes.

For a dense and an MoE model, one torchrun launch (this file run as a script, `__main__` below) trains the tiny config
uninterrupted and, in a second run directory, stopped after step 2 and resumed. The tests then check, against a
single-process run with the same global batch: the logged losses and gradient norms (fp32, rtol 1e-4), the saved
files (same names, shapes, dtypes and optimizer-state layout as a single process; `load_run` loads them; the dense
one exports to transformers), exact resume under FSDP (final weights and logged values equal to the uninterrupted
FSDP run), and that a single process resumes an FSDP checkpoint.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# 4 optimizer steps of 4 micro-batches x 2 sequences: each of the 2 ranks runs 2 micro-batches (the global batch is
# the single process's); one checkpoint at step 4, evaluation at step 4 only, on 5 blocks of 64 tokens = 3 batches
# (rank 0 scores two, rank 1 one and joins the second all-gathers with a forward whose result is dropped)
COMMON = ["train.grad_accum=4", "train.micro_batch_size=2", "train.max_steps=4", "train.log_interval=1",
          "train.eval_interval=4", "train.ckpt_interval=4", "train.eval_tokens=320", "train.sample_max_new_tokens=2",
          "train.peak_flops=1e12"]
KINDS = {
    "dense": [],  # the tiny config's SwiGLU
    # aux-loss-free balancing: its per-step hook all-reduces the routing counts itself
    "moe": ["model.ffn.type=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2", "model.ffn.balancing=aux_free",
            "model.ffn.bias_update_rate=0.01"],
}
STOP_AT = 2
COMPARED = ("type", "step", "tokens", "loss", "lr", "grad_norm", "val_loss", "val_bpb", "aux_loss", "z_loss",
            "expert_load")


def overrides(cache, out_dir, kind, *extra):
    return [f"data.cache_dir={cache}", f"train.out_dir={out_dir}", *COMMON, *KINDS[kind], *extra]


def launch_fsdp(cache, base: Path, kind: str) -> float:
    """One torchrun launch of two processes that writes base/full (uninterrupted) and base/resumed (stopped after
    step STOP_AT, then resumed); returns its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(cache), str(base), kind], cwd=ROOT, capture_output=True, text=True,
                          timeout=420, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return time.perf_counter() - t0


def train_rows(run):
    from train.runs import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"]


def same_values(row):
    return {k: row[k] for k in COMPARED if k in row}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fsdp_two_processes_match_one_process_save_single_process_files_and_resume_exactly(kind, tiny_data_cache,
                                                                                          tmp_path):
    from train.checkpoint import STATE, list_checkpoints, load_run, load_state
    from train.config_load import load_config
    from train.runs import read_metrics
    from train.trainer import train

    single = tmp_path / "single"
    train(load_config(TINY, overrides(tiny_data_cache, single, kind)))
    seconds = launch_fsdp(tiny_data_cache, tmp_path, kind)
    print(f"fsdp {kind}: one torchrun launch (2 processes, 3 trainings) took {seconds:.1f} s")
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    # (a) same global batch: the logged losses follow the single-process run's (fp32 reductions in another order)
    one, two = train_rows(single), train_rows(full)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-5)  # the global norm, not a shard's
        if kind == "moe":
            assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-3, abs=1e-6)
    final_one, final_two = read_metrics(single / "metrics.jsonl")[-1], read_metrics(full / "metrics.jsonl")[-1]
    assert final_two["type"] == "final" and final_two["val_tokens"] == final_one["val_tokens"] == 5 * 64
    assert final_two["val_loss"] == pytest.approx(final_one["val_loss"], rel=1e-4)
    assert final_two["tune_loss"] == pytest.approx(final_one["tune_loss"], rel=1e-4)
    assert (full / "samples.md").is_file()  # generated on rank 0 from an unsharded copy

    # (b) the files a single process writes: same tensor names, shapes, fp32, tied embedding stored once
    w_one, w_two = load_file(str(single / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert sorted(w_two) == sorted(w_one)
    assert all(w_two[k].shape == w_one[k].shape and w_two[k].dtype == torch.float32 for k in w_one)
    with safe_open(str(single / "model.safetensors"), "pt") as f1, safe_open(str(full / "model.safetensors"),
                                                                             "pt") as f2:
        assert f2.metadata()["aliases"] == f1.metadata()["aliases"] != "{}"
    if kind == "moe":  # the aux-free bias moved, identically on both ranks (rank 0's copy was saved)
        biases = {k: v for k, v in w_two.items() if k.endswith("selection_bias")}
        assert len(biases) == 2 and any(v.abs().sum() > 0 for v in biases.values())
        for k, v in biases.items():
            torch.testing.assert_close(v, w_one[k], rtol=0, atol=1e-6)
    s_one, s_two = load_state(list_checkpoints(single)[-1][1]), load_state(list_checkpoints(full)[-1][1])
    opt_one, opt_two = s_one["optimizer"], s_two["optimizer"]
    assert sorted(opt_two["state"]) == sorted(opt_one["state"])  # parameters by index, as in one process
    assert [g["params"] for g in opt_two["param_groups"]] == [g["params"] for g in opt_one["param_groups"]]
    for i, st in opt_one["state"].items():
        assert {k: tuple(v.shape) for k, v in opt_two["state"][i].items()} == \
               {k: tuple(v.shape) for k, v in st.items()}
    assert s_two["world_size"] == 2
    model, _, cfg = load_run(full)
    assert cfg.train.parallel == "fsdp"
    assert all(torch.equal(model.state_dict()[k], w_two[k]) for k in w_two)
    if kind == "dense":
        from train.export_hf import export_run

        _, cls = export_run(full, tmp_path / "hf")
        assert cls == "LlamaForCausalLM" and (tmp_path / "hf" / "model.safetensors").is_file()

    # (c) exact resume under FSDP (same world size): stopped after step 2, resumed, equal to the uninterrupted run
    assert [s for s, _ in list_checkpoints(resumed)] == [STOP_AT, 4]
    w_res = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(w_res[k], w_two[k]) for k in w_two)
    rows_full, rows_res = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [same_values(r) for r in rows_res] == [same_values(r) for r in rows_full]

    # a single process resumes the FSDP checkpoint of step 2 (another world size: close, not bitwise)
    if kind == "dense":
        other = tmp_path / "one-from-fsdp"
        shutil.copytree(resumed, other, ignore=shutil.ignore_patterns("step_000004", ".lock"))
        train(load_config(TINY, overrides(tiny_data_cache, other, kind, "train.parallel=fsdp")))
        state = torch.load(other / STATE, weights_only=True)
        assert state["step"] == 4 and state["world_size"] == 1
        for a, b in zip(train_rows(full)[STOP_AT:], train_rows(other)[STOP_AT:]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)


def test_one_process_fsdp_is_the_plain_model():
    """In a single process train.parallel=fsdp wraps nothing: the run is the plain single-process run."""
    from model.config import MiniMindConfig
    from model.model_minimind import MiniMindForCausalLM
    from train.train_state import is_sharded
    from train.runtime import Runtime, shard_model, wrap_model

    rt = Runtime(device=torch.device("cpu"), dtype="fp32", parallel="fsdp")
    assert not rt.fsdp and not rt.ddp and not rt.distributed
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, max_seq_len=16))
    assert shard_model(model, model.model.layers, rt) is model and wrap_model(model, rt) is model
    assert not is_sharded(model) and type(model) is MiniMindForCausalLM
    assert Runtime(device=torch.device("cpu"), dtype="fp32", world_size=2, parallel="fsdp").fsdp


def test_mixed_precision_policy_only_for_cuda_bf16():
    from train.runtime import Runtime, fsdp_mixed_precision

    policy = fsdp_mixed_precision(Runtime(device=torch.device("cuda", 0), dtype="bf16", world_size=8,
                                          parallel="fsdp"))
    assert policy.param_dtype is torch.bfloat16 and policy.reduce_dtype is torch.float32
    assert policy.cast_forward_inputs is False  # the residual stream stays fp32, as under DDP + autocast
    assert fsdp_mixed_precision(Runtime(device=torch.device("cuda", 0), dtype="fp32", world_size=8)) is None
    assert fsdp_mixed_precision(Runtime(device=torch.device("cpu"), dtype="bf16", world_size=2)) is None


def test_parallel_key_is_validated():
    from train.config_load import load_config
    from train.errors import ConfigError

    assert load_config(TINY, []).train.parallel == "ddp"
    assert load_config(TINY, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(TINY, ["train.parallel=zero3"])
    with pytest.raises(ConfigError, match="train.parallel=fsdp does not take train.dtype=fp16"):
        load_config(TINY, ["train.parallel=fsdp", "train.dtype=fp16"])


def _fsdp_driver(cache: str, base: str, kind: str) -> None:
    """Under torchrun: the uninterrupted run, then the stopped and resumed one, in one process group."""
    import torch.distributed as dist

    from train import runtime, train_state, trainer
    from train.config_load import load_config
    from train.trainer import TrainingInterrupted, train

    dist.init_process_group("gloo")
    runtime.Runtime.close = lambda self: None  # keep the group between the three trainings
    sharded, shard_model = [], trainer.shard_model

    def spy(model, blocks, rt):  # records that each training did shard its model
        model = shard_model(model, blocks, rt)
        sharded.append(train_state.is_sharded(model) and all(train_state.is_sharded(b) for b in blocks))
        return model

    trainer.shard_model = spy
    try:
        base_dir = Path(base)
        train(load_config(TINY, overrides(cache, base_dir / "full", kind, "train.parallel=fsdp")))
        resumed = overrides(cache, base_dir / "resumed", kind, "train.parallel=fsdp")
        try:
            train(load_config(TINY, [*resumed, f"train.stop_at_step={STOP_AT}"]))
            raise AssertionError(f"train.stop_at_step={STOP_AT} did not stop the run")
        except TrainingInterrupted:
            pass
        train(load_config(TINY, resumed))
        assert sharded == [True, True, True], sharded
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_driver(*sys.argv[1:4])
