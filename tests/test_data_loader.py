"""TrainBatches: blocks from the memory-mapped shard, a pure function of (seed, step, micro_step, rank)."""
import numpy as np
import pytest

from train.config import load_config
from train.data import TrainBatches
from train.errors import DataError

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


def test_batches_depend_only_on_data_and_seed_not_the_model(shard):
    # The trainer builds the loader from the train section and the sequence length only; two FFN variants agree.
    streams = []
    for ffn in (["model.ffn.type=glu"], ["model.ffn.type=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2"]):
        cfg = load_config("configs/base.yaml", ffn)
        loader = TrainBatches(shard, np.uint16, cfg.model.max_seq_len, cfg.train.micro_batch_size,
                              cfg.train.grad_accum, cfg.train.seed)
        streams.append([loader.get(step)[0] for step in range(3)])
    assert all((a == b).all() for a, b in zip(*streams))


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
