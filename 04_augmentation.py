"""04 · Data augmentation on top of label smoothing.

Question: do random rotations, shears, shifts, resized crops, perspective and colour jitter, drawn
independently per image, make the model generalize better, in-domain and to MNIST?
Differs from 03 only in the augmentation strengths of AUGMENT_04 (common/config.py, where each has its
why; common/augment.py applies them on the device, one grid_sample per batch); same 15-epoch budget, so
04 vs 03 is the augmentation alone. Writes augmented.png: originals beside their augmented versions.
    python 04_augmentation.py [--rotate 15] [--jitter 0.3] [--quick]
"""
from common import AUGMENT_04, Config, cli, run

CONFIG = Config(
    name="04_augmentation",
    label_smoothing=0.1,  # keep 03's gain: augmentation is studied on top of it
    **AUGMENT_04,         # the variable under study
)

if __name__ == "__main__":
    run(cli(CONFIG))
