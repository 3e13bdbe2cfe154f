import os
import tempfile

# wandb must never touch the network in tests.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="wandb-tests-"))
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_cache(tmp_path_factory):
    """A data.cache_dir holding configs/tiny.yaml's prepared Shakespeare slice, built once per test session.
    Use it as the override `data.cache_dir=<path>` with configs/tiny.yaml."""
    from pathlib import Path

    from train.config import load_config
    from train.data import prepare_data

    cache = tmp_path_factory.mktemp("tiny-data")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [f"data.cache_dir={cache}"])
    prepare_data(cfg.data, progress=False)
    return cache
