"""01 · ResNet-18 (BasicBlock) trained on SVHN, tested on SVHN and on MNIST (cross-domain).

Question: how well does a standard ResNet-18 learn SVHN, and how much of it carries over to MNIST?
The baseline every other experiment changes one thing of: SGD + Nesterov, one-cycle lr, BatchNorm.
    python 01_base.py [--epochs 15] [--seed 0] [--quick] [--data-dir data]
"""
from common import Config, cli, run

CONFIG = Config(name="01_base")

if __name__ == "__main__":
    run(cli(CONFIG))
