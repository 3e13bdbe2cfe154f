"""Sample text from a run's checkpoint, streamed to stdout as it is generated.

    python scripts/generate.py --run runs/shakespeare-glu-silu --prompt "ROMEO:" [--max-new-tokens 200]
        [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--greedy] [--seed 0] [--device auto]

Uses the run's tokenizer.json and the model's KV-cache generation; stops at the end-of-document token. Prints the
prompt followed by the completion. An empty prompt starts a new document (generation begins after the
end-of-document token).
"""
from __future__ import annotations

import sys

from _cli import _Parser, run_main


class StreamDecoder:
    """Decode a growing list of byte-level BPE token ids into text pieces that are safe to print.

    One token can end in the middle of a multi-byte UTF-8 character, which decodes to U+FFFD until the rest arrives.
    Decoding the whole sequence each time and holding back a trailing U+FFFD run keeps every printed piece final;
    `flush()` prints whatever is left (a genuinely invalid tail)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._text()
        stable = len(text.rstrip("\ufffd"))
        piece = text[self.printed:stable]
        self.printed = max(self.printed, stable)
        return piece

    def flush(self) -> str:
        text = self._text()
        piece, self.printed = text[self.printed:], len(text)
        return piece


def parse_args():
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with a checkpoint")
    parser.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="at most this many new tokens (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token (deterministic)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    args = parser.parse_args()
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def main() -> int:
    args = parse_args()
    from contextlib import redirect_stdout
    from pathlib import Path

    from train.errors import CheckpointError, ConfigError

    if not Path(args.run).is_dir():  # before the slow imports: a typo fails fast
        raise CheckpointError(f"run directory not found: {args.run}")
    import torch

    from train.checkpoint import load_run

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; valid here: auto, cpu")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    with redirect_stdout(sys.stderr):  # checkpoint warnings must not mix with the generated text
        model, tokenizer, cfg = load_run(Path(args.run), device=device)
    eos_id = tokenizer.token_to_id(cfg.data.tokenizer.special_tokens[0])
    prompt_ids = tokenizer.encode(args.prompt).ids or ([eos_id] if eos_id is not None else [])
    if not prompt_ids:
        raise ConfigError("--prompt is empty and the run's tokenizer has no end-of-document token to start from")

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    x_1T = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    decoder = StreamDecoder(tokenizer)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    tail = args.prompt
    for token_id in model.generate_stream(x_1T, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p, eos_token_id=eos_id, greedy=args.greedy,
                                          generator=generator):
        piece = decoder.push(token_id)
        if piece:
            out.write(piece)
            out.flush()
            tail = piece
    piece = decoder.flush()
    out.write(piece + ("" if (piece or tail).endswith("\n") else "\n"))
    out.flush()
    return 0


if __name__ == "__main__":
    try:
        run_main(main)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
