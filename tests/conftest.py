import os
import tempfile

# wandb must never touch the network in tests.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="wandb-tests-"))
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the matmul-peak cache (train/hardware.py) of a test session never mixes with the user's
os.environ["MINIMIND_CACHE_DIR"] = tempfile.mkdtemp(prefix="minimind-cache-tests-")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_cache(tmp_path_factory):
    """A data.cache_dir holding configs/tiny.yaml's prepared Shakespeare slice, built once per test session.
    Use it as the override `data.cache_dir=<path>` with configs/tiny.yaml."""
    from pathlib import Path

    from train.config_load import load_config
    from train.data import prepare_data

    cache = tmp_path_factory.mktemp("tiny-data")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [f"data.cache_dir={cache}"])
    prepare_data(cfg.data, progress=False)
    return cache


@pytest.fixture(scope="session")
def tiny_run(tiny_data_cache, tmp_path_factory):
    """A finished 20-step run of configs/tiny.yaml trained under bf16 autocast (train.dtype=bf16), evaluated at
    steps 10 and 20, one checkpoint (step 20). For tools that read runs (generate, evaluate, export). Read-only."""
    from pathlib import Path

    from train.config_load import load_config
    from train.trainer import train

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
                      [f"data.cache_dir={tiny_data_cache}", f"train.out_dir={out}", "train.max_steps=20",
                       "train.dtype=bf16", "train.eval_interval=10", "train.ckpt_interval=20",
                       "train.peak_flops=1e12"])
    train(cfg)
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The project's per-user cache (matmul peak, dtype probe: train/hardware.py cache_dir()) in a temporary
    directory."""
    monkeypatch.setenv("MINIMIND_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls only lose from threads, badly so on a busy machine (the tests share 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
