"""TrainBatches: blocks from the memory-mapped shard, a pure function of (seed, step, micro_step, rank)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from train.config_load import load_config
from train.data import TrainBatches
from train.errors import DataError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
N_TOKENS = 60_000  # token i has id i: every block shows where it starts


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "train.bin"
    np.arange(N_TOKENS, dtype=np.uint16).tofile(path)
    return path


def batches(shard, seed=0, seq_len=16, mb=4, ga=1, rank=0, world_size=1):
    return TrainBatches(shard, np.uint16, seq_len, mb, ga, seed, rank=rank, world_size=world_size)


def test_blocks_are_consecutive_tokens_shifted_by_one(shard):
    x, y = batches(shard).get(step=3)
    assert x.shape == y.shape == (4, 16) and str(x.dtype) == "torch.int64" == str(y.dtype)
    assert x.is_contiguous() and y.is_contiguous()
    x, y = x.numpy(), y.numpy()
    assert (np.diff(x, axis=1) == 1).all()  # a run of consecutive tokens of the shard
    assert (y == x + 1).all()  # y[t] is the token after x[t]
    assert (x[:, 0] >= 0).all() and (y[:, -1] < N_TOKENS).all()


def test_same_seed_same_batches_other_seed_other_batches(shard):
    a, b, c = batches(shard, seed=1), batches(shard, seed=1), batches(shard, seed=2)
    for step in range(5):
        assert (a.get(step)[0] == b.get(step)[0]).all()
    assert not (a.get(0)[0] == c.get(0)[0]).all()
    assert not (a.get(0)[0] == a.get(1)[0]).all()  # and each step draws new blocks


def test_every_variant_trains_on_the_same_batches(tiny_data_cache, tmp_path, monkeypatch):
    """The batches two different models' trainers actually consume (recorded at TrainBatches.get) are the same, step by
    step and micro-step by micro-step; another seed gives other batches, so the comparison can fail."""
    from train.trainer import train

    consumed = []
    real_get = TrainBatches.get

    def recording_get(self, step, micro_step=0):
        x, y = real_get(self, step, micro_step)
        consumed[-1].append((step, micro_step, x.clone(), y.clone()))
        return x, y

    monkeypatch.setattr(TrainBatches, "get", recording_get)
    runs = {"dense": ["model.ffn.type=dense", "model.ffn.activation=gelu"],
            "moe": ["model.ffn.type=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2"],
            "dense-seed1": ["model.ffn.type=dense", "model.ffn.activation=gelu", "train.seed=1"]}
    streams = {}
    for name, ffn in runs.items():
        consumed.append([])
        train(load_config(TINY, [
            f"data.cache_dir={tiny_data_cache}", f"train.out_dir={tmp_path / name}", "train.max_steps=2",
            "train.micro_batch_size=2", "train.grad_accum=2", "train.eval_tokens=64", "train.eval_interval=2",
            "train.ckpt_interval=2", "train.sample_max_new_tokens=1", "train.sample_prompts=[A]", *ffn]))
        streams[name] = consumed[-1]

    dense, moe, other = streams["dense"], streams["moe"], streams["dense-seed1"]
    assert [(s, m) for s, m, _, _ in dense] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # 2 steps x 2 micro-steps
    assert [(s, m) for s, m, _, _ in moe] == [(s, m) for s, m, _, _ in dense]
    for (_, _, x_a, y_a), (_, _, x_b, y_b) in zip(dense, moe):
        assert x_a.shape == (2, 64) and torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    assert len(other) == len(dense) and not any(torch.equal(a[2], b[2]) for a, b in zip(dense, other))


def test_resume_needs_only_the_step(shard):
    walked = batches(shard, seed=5)
    for step in range(7):
        walked.get(step)
    fresh = batches(shard, seed=5)
    assert (fresh.get(7)[0] == walked.get(7)[0]).all()


def test_ranks_and_micro_steps_split_one_global_batch(shard):
    single = batches(shard, mb=4, ga=2, world_size=1)
    ranks = [batches(shard, mb=2, ga=2, rank=r, world_size=2) for r in range(2)]
    for step in (0, 9):
        for micro in range(2):
            parts = [r.get(step, micro)[0].numpy() for r in ranks]
            assert not set(parts[0][:, 0]) & set(parts[1][:, 0])  # disjoint blocks
            assert (np.concatenate(parts) == single.get(step, micro)[0].numpy()).all()
    # the same global batch again with one micro-step of 8 sequences
    whole = batches(shard, mb=8, ga=1).get(0)[0].numpy()
    assert (np.concatenate([single.get(0, 0)[0].numpy(), single.get(0, 1)[0].numpy()]) == whole).all()


def test_bad_arguments(shard, tmp_path):
    tiny = tmp_path / "tiny.bin"
    np.arange(10, dtype=np.uint16).tofile(tiny)
    with pytest.raises(DataError, match="fewer than one block"):
        batches(tiny, seq_len=16)
    with pytest.raises(ValueError, match="rank"):
        batches(shard, rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_step"):
        batches(shard, ga=2).get(0, 2)
