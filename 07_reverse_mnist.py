"""07 · Reverse direction: train on MNIST with the best recipe of 01-06, test on MNIST and SVHN.

Question: how far does a model trained on clean MNIST digits carry over to street-view SVHN digits?
Differs from 01_base in the training set (MNIST) and in the recipe: the architecture, optimizer,
lr, label smoothing and augmentation of the finished 01-06 experiment with the best mean validation
accuracy in results/, ranked only among runs of one profile (same data, budget, validation) on the
seeds they share (metrics.json's config.inherited_from says which and why; runs of several profiles
are refused). With none finished yet, the recipe below is used: 04's (augmentation + label
smoothing). Flags on the command line win over the inherited recipe; --no-inherit-best uses this
file's recipe. Saves model.pt for 08. Two cross-domain choices are 07's own: each image standardized
by its own statistics, and half the training images inverted (README: what they change).
    python 07_reverse_mnist.py [--train-subset 10000] [--epochs 5] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="07_reverse_mnist",
    dataset="mnist",      # the variable under study
    inherit_best=True,
    epochs=10,            # MNIST is easy: 10 epochs of 57k images is ample
    input_norm="image",   # MNIST is always white on black: the train-set mean/std would misread SVHN's lighting
    invert=0.5,           # SVHN has dark-on-light digits too; MNIST alone never shows one
    label_smoothing=0.1,  # default recipe = 04's, used when no 01-06 run has finished
    rotate=15, shear=10, translate=0.1, crop_scale=0.25, perspective=0.15, jitter=0.3,
)

if __name__ == "__main__":
    run(cli(CONFIG))
