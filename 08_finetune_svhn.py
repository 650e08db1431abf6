"""08 · Fine-tune 07's MNIST model on a small labelled subset of SVHN.

Question: how much SVHN does a few labelled images buy once a model knows MNIST, and how much of
MNIST does it then forget? Starts from results/07_reverse_mnist/seed-K/model.pt (same seed) and
trains on a class-stratified subset of SVHN train drawn with the run's seed (--subset-size, default
1000: the whole label budget, its validation split carved out of it) with a lower peak lr. --sweep:
subset sizes --sweep-sizes, fine-tuned versus trained from scratch on the same network and budget
(only the initialization and its lr, --scratch-lr, differ), plotted as label_efficiency.png.
    python 08_finetune_svhn.py [--subset-size 1000] [--sweep] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="08_finetune_svhn",
    init_from="07_reverse_mnist",  # the variable under study: start from the MNIST model
    train_subset=1000,             # labelled SVHN images in all, validation included (alias --subset-size)
    epochs=30,                     # a small set: more passes, a few hundred steps in all
    lr=0.02,                       # fine-tuning: keep what MNIST taught
    label_smoothing=0.1,
    rotate=15, shear=10, translate=0.1, crop_scale=0.25, perspective=0.15, jitter=0.3,  # 04's: few labels need it most
)

if __name__ == "__main__":
    run(cli(CONFIG))
