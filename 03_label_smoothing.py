"""03 · Label smoothing on the base model.

Question: does softening the one-hot targets (less over-confident logits) help SVHN and MNIST?
Differs from 01_base only in label_smoothing=0.1, through torch.nn.CrossEntropyLoss(label_smoothing=).
    python 03_label_smoothing.py [--label-smoothing 0.1] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="03_label_smoothing",
    label_smoothing=0.1,  # the usual epsilon (Szegedy et al. 2016); --label-smoothing to try others
)

if __name__ == "__main__":
    run(cli(CONFIG))
