"""Export a run's checkpoint to a Hugging Face transformers directory (safetensors + config + tokenizer).

    python scripts/export_hf.py --run runs/shakespeare-glu-silu --out hf/shakespeare-glu-silu

The directory loads without custom code:
    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)
The FFN block class decides the mapping (its hf_export): GLU variants become LlamaForCausalLM, MoE variants (GLU
experts, softmax top-k>=2 routing with renormalised weights, no shared experts, no selection bias, no token dropping)
MixtralForCausalLM. Other variants have no exact equivalent and are refused with the reason. Needs transformers
(pip install -r requirements-dev.txt).
"""
from _cli import _Parser, run_main


def main() -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with a checkpoint")
    parser.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    args = parser.parse_args()

    from pathlib import Path

    from train.export_hf import export_run

    out, architecture = export_run(Path(args.run), Path(args.out))
    print(f"exported {args.run} as {architecture} -> {out}\n"
          f"load it with transformers.AutoModelForCausalLM.from_pretrained('{out}') and AutoTokenizer")
    return 0


if __name__ == "__main__":
    run_main(main)
