"""06 · AdamW instead of SGD.

Question: does an adaptive optimizer find a better solution than SGD + Nesterov for this network?
Differs from 01_base only in the optimizer and its own lr and weight decay. AdamW rather than Adam:
with Adam, L2 weight decay is rescaled by the adaptive step and barely regularizes; AdamW decouples it,
so the decay is the one we set (Loshchilov & Hutter 2019).
    python 06_adam.py [--lr 0.002] [--weight-decay 0.05] [--quick]
"""
from common import Config, cli, run

CONFIG = Config(
    name="06_adam",
    optimizer="adamw",   # the variable under study
    lr=2e-3,             # Adam's steps are normalized: its usable peak lr is ~50x smaller than SGD's
    weight_decay=0.05,   # decoupled decay is not multiplied by the lr's scale as L2 is in SGD
)

if __name__ == "__main__":
    run(cli(CONFIG))
