"""Fine-tune a masked diffusion model of proteins (ProteinMPNN on RFP backbones): a thin entry point over
`genalign finetune`, then `genalign gallery` of the run (sequence logos, per-sample oracle and gold scores;
--no-gallery skips it, --gallery-n N sets the samples per prompt).

    python scripts/finetune_protein.py --config configs/drakes_protein.yaml
    python scripts/finetune_protein.py --config configs/drakes_protein.yaml epochs=4 trainer.output_dir=runs/try
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genalign.cli import finetune_then_gallery  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_then_gallery(sys.argv[1:]))
