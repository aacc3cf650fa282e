"""Fine-tune a text-to-audio model (the tones world's AudioLDM-layout model, or any AudioLDM / MusicLDM folder or
hub id): a thin entry point over `genalign finetune`, then `genalign gallery` of the run (an audio player and a
spectrogram per clip, before and after, with rewards and gold verdicts; --no-gallery skips it, --gallery-n N
sets the clips per prompt).

    python scripts/finetune_audio.py --config configs/ddpo_tones.yaml
    python scripts/finetune_audio.py --config configs/prdp_tones.yaml
    python scripts/finetune_audio.py --config configs/draft_tones.yaml epochs=4 trainer.output_dir=runs/try
    python scripts/finetune_audio.py --config configs/dragon_tones.yaml            # DRAGON; also _aesthetic,
                                                    # _exemplar_fd, _dataset_fd, _vendi (one per reward kind)

A DRAGON run also writes one round's demonstrations, D+ and D− per prompt with their rewards, to
<output_dir>/demonstrations/round_0000/index.html.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genalign.cli import finetune_then_gallery  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_then_gallery(sys.argv[1:]))
