"""Train (or resume) one model from a config file.

    python scripts/train.py --config configs/shakespeare.yaml [key=value ...]
    torchrun --nproc_per_node=2 scripts/train.py --config configs/shakespeare.yaml

The run directory is train.out_dir (default runs/<name>/). Running the same command again on a directory with a
checkpoint resumes it; train.resume=false refuses to reuse a non-empty directory. Ctrl-C (or SIGTERM) saves a
checkpoint at the end of the current step and exits with status 130.
"""
from _cli import make_parser, run_main


def main() -> int:
    args = make_parser(__doc__.splitlines()[0]).parse_args()
    from train.config_load import load_config
    from train.trainer import TrainingInterrupted, train

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except TrainingInterrupted as e:
        import sys
        print(str(e), file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    run_main(main)
