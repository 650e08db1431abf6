"""04 · Data augmentation on top of label smoothing.

Question: do random rotations, shears, shifts, resized crops, perspective and colour jitter, drawn
independently per image, make the model generalize better, in-domain and to MNIST?
Differs from 03 only in the augmentation strengths below (common/augment.py applies them on the
device, one grid_sample per batch); same 15-epoch budget, so 04 vs 03 is the augmentation alone.
Writes augmented.png: originals beside their augmented versions.
    python 04_augmentation.py [--rotate 15] [--jitter 0.3] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="04_augmentation",
    label_smoothing=0.1,  # keep 03's gain: augmentation is studied on top of it
    rotate=15,            # degrees: house numbers are photographed a little tilted, never upside down
    shear=10,             # degrees
    translate=0.1,        # SVHN crops are not centred exactly on the digit
    crop_scale=0.25,      # keep 75-100% of the area: a tighter crop still shows the digit whole
    perspective=0.15,     # street-view photos are taken at an angle
    jitter=0.3,           # brightness, contrast, saturation: lighting varies from house to house
)

if __name__ == "__main__":
    run(cli(CONFIG))
