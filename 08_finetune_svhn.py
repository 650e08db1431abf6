"""08 · Fine-tune 07's MNIST model on a small labelled subset of SVHN.

Question: how much SVHN does a few labelled images buy once a model knows MNIST, and how much of
MNIST does it then forget? Starts from results/07_reverse_mnist/seed-K/model.pt (same seed) and
trains on a seeded, class-stratified subset of SVHN train (--subset-size, default 1000) with a lower
peak lr. --sweep: subset sizes --sweep-sizes, fine-tuned versus trained from scratch with the same
budget, plotted as label_efficiency.png.
    python 08_finetune_svhn.py [--subset-size 1000] [--sweep] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="08_finetune_svhn",
    init_from="07_reverse_mnist",  # the variable under study: start from the MNIST model
    train_subset=1000,             # labelled SVHN images (alias --subset-size)
    epochs=30,                     # a small set: more passes, same few hundred steps as a short run
    lr=0.02,                       # fine-tuning: keep what MNIST taught
    label_smoothing=0.1,
    rotate=15, shear=10, translate=0.1, crop_scale=0.25, perspective=0.15, jitter=0.3,  # 04's: few labels need it most
)

if __name__ == "__main__":
    run(cli(CONFIG))
