"""02 · ResNet-18 without BatchNorm on SVHN.

Question: how much do BatchNorm layers buy in stability and accuracy, in-domain and on MNIST?
Differs from 01_base only in norm="none" (each residual branch starts at zero, SkipInit) and the
lower peak learning rate it needs.
    python 02_no_bn.py [--epochs 15] [--lr 0.05] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="02_no_bn",
    norm="none",  # the variable under study
    lr=0.05,      # without BN nothing renormalizes the activations: half the base's peak, for safety margin
)

if __name__ == "__main__":
    run(cli(CONFIG))
