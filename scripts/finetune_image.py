"""Fine-tune a text-to-image diffusion model: a thin entry point over `genalign finetune`.

    python scripts/finetune_image.py --config configs/ddpo_tiny.yaml trainer.learning_rate=1e-3
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genalign.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
