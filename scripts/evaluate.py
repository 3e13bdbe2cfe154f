"""Score a run's checkpoint: loss, perplexity and bits per byte on a validation split.

    python scripts/evaluate.py --run runs/shakespeare-glu-silu                 # the run's own validation set
    python scripts/evaluate.py --run runs/shakespeare-glu-silu --text my.txt   # all of your own text file
    python scripts/evaluate.py --run RUN --config configs/data/tinystories.yaml --json   # any corpus config
    python scripts/evaluate.py --run RUN data.corpus=local data.path='books/*.txt' data.sample_by=paragraph

Validation uses the same blocks as training (train.data.val_batches: the reporting half of the validation split,
consecutive max_seq_len blocks from its start, train.eval_tokens of them, null = the whole half; a last partial block
is not scored; any other data — --text, --config, data.* — is scored whole) and
the run's precision (train.dtype autocast), so the run's own validation set gives the trainer's numbers exactly.
Text is always tokenized with the run's tokenizer.json. --text FILE is short for data.corpus=local data.path=FILE
data.val_path=FILE train.eval_tokens=null (the whole file, as one document). Without --config, data.* overrides
apply to the run's own data section, except that naming another corpus (data.corpus, data.path, data.hf_name)
starts from the default data settings (keeping data.cache_dir); with --config FILE they apply to FILE's data
section. Other overrides: train.eval_tokens, train.micro_batch_size (the evaluation batch), train.device,
train.dtype, train.num_threads. The logic lives in train/evaluation.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

from _cli import make_parser, run_main


def parse_args():
    parser = make_parser(__doc__.splitlines()[0], config_required=False)
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with a checkpoint")
    parser.add_argument("--text", help="score all of this text file (UTF-8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    if args.text is not None and args.config is not None:
        parser.error("use either --text FILE or --config FILE, not both")
    if args.text is not None and not Path(args.text).is_file():
        parser.error(f"--text: file not found: {args.text}")
    return args


def main() -> int:
    args = parse_args()
    import json

    from train.evaluation import evaluate_run, format_result

    result = evaluate_run(args.run, args.config, args.overrides, args.text)
    print(json.dumps(result) if args.json else format_result(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main)
