"""Pre-train a masked discrete diffusion model (genalign.generators.masked) on a file of sequences.

    python scripts/pretrain_masked.py data.fasta runs/masked-dna --alphabet ACGT --steps 3000
    python scripts/pretrain_masked.py data.csv runs/masked --column sequence --backbone transformer

Input formats, the length rule and the training recipe: genalign/generators/masked_pretraining.py.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genalign.generators.masked import MaskedDiffusionConfig  # noqa: E402
from genalign.generators.masked_pretraining import pretrain_masked, read_sequences  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="FASTA, CSV or one-sequence-per-line file")
    parser.add_argument("output_dir", help="folder for config.json + model.safetensors")
    parser.add_argument("--alphabet", default="ACGT")
    parser.add_argument("--column", default="sequence", help="CSV column holding the sequences")
    parser.add_argument("--length", type=int, help="model length L (default: the most common length)")
    parser.add_argument("--backbone", choices=["cnn", "transformer"], default="cnn")
    defaults = MaskedDiffusionConfig()
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--kernel-size", type=int, default=defaults.kernel_size)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    try:
        sequences = read_sequences(args.data, column=args.column)
        length = args.length or Counter(len(s) for s in sequences).most_common(1)[0][0]
        config = replace(defaults, alphabet=args.alphabet, length=length, backbone=args.backbone,
                         hidden_size=args.hidden_size, num_layers=args.num_layers, kernel_size=args.kernel_size,
                         num_heads=args.num_heads)
        result = pretrain_masked(sequences, args.output_dir, config=config, steps=args.steps,
                                 batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                                 eval_every=args.eval_every, seed=args.seed, device=args.device)
    except (FileNotFoundError, ValueError) as error:  # bad input: one line, no traceback
        parser.exit(2, f"pretrain_masked: {error}\n")
    first, last = result.history[0]["heldout_loss"], result.history[-1]["heldout_loss"]
    print(f"held-out loss {first:.4f} → {last:.4f} nats/token; saved to {result.output_dir}")


if __name__ == "__main__":
    main()
