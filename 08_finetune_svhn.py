"""08 · Fine-tune 07's MNIST model on a small labelled subset of SVHN.

Question: how much SVHN does a few labelled images buy once a model knows MNIST, and how much of
MNIST does it then forget? Starts from results/07_reverse_mnist/seed-K/model.pt (same seed) and
trains on a class-stratified subset of SVHN train drawn with the run's seed (--subset-size, default
1000: the whole label budget, its validation split carved out of it) with a lower peak lr. Inputs are
normalized as 07's network does: each image by its own mean and std in 07's recipe (--input-norm image);
a 07 trained with --input-norm dataset gets the SVHN subset's statistics instead of MNIST's.
--sweep trains 2 models per size of --sweep-sizes: fine-tuned from 07 and from scratch, on the same
network and budget (only the initialization and its lr, --scratch-lr, differ): label_efficiency.png.
    python 08_finetune_svhn.py [--subset-size 1000] [--sweep] [--quick]
"""
import dataclasses
import re
from dataclasses import dataclass

from common import AUGMENT_04, Config, UserError, cli, launch
from common.data import load
from common.experiment import load_run_model, network_of, train_and_test, write_sweep
from common.lifecycle import resolve, run_dir


@dataclass(frozen=True)
class FinetuneConfig(Config):
    init_from: str = "07_reverse_mnist"           # the experiment whose seed-matched model.pt this run starts from
    sweep: bool = False                           # label-efficiency sweep: fine-tuned vs from scratch at each size
    sweep_sizes: str = "100,300,1000,3000,10000"  # labelled images (train + validation) at each point of the sweep
    scratch_lr: float = 0.1                       # --sweep: peak lr of the from-scratch arm (01's: nothing to protect)

    def __post_init__(self):
        super().__post_init__()
        if not (self.scratch_lr > 0 and all(s.isdigit() and int(s) > 0 for s in self.sweep_sizes.split(","))):
            raise UserError(f"--sweep-sizes must be comma-separated positive integers and --scratch-lr > 0, got "
                            f"{self.sweep_sizes!r} and {self.scratch_lr}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.init_from):
            raise UserError(f"--init-from must name an experiment (a results folder), got {self.init_from!r}")
        if self.init_from == self.name:  # it would fine-tune from the very model this run replaces
            raise UserError(f"--init-from {self.init_from} is this run's own experiment: name the one to start from")


CONFIG = FinetuneConfig(
    name="08_finetune_svhn",
    train_subset=1000,    # labelled SVHN images in all, validation included (alias --subset-size)
    epochs=30,            # a small set: more passes, a few hundred steps in all
    lr=0.02,              # fine-tuning: keep what MNIST taught
    label_smoothing=0.1,
    **AUGMENT_04,         # few labels need augmentation most
)


def sweep_sizes(cfg):
    """The sweep's sizes, checked against the labelled images before anything trains; duplicates once."""
    available = len(load(cfg.dataset, "train", cfg.data_dir)[1])
    sizes = sorted({int(s) for s in cfg.sweep_sizes.split(",")})
    if any(n > available for n in sizes):
        print(f"sweep: skipping sizes above the {available} labelled images: {[n for n in sizes if n > available]}")
    sizes = [n for n in sizes if n <= available]
    if not sizes:
        raise UserError(f"--sweep-sizes: every size exceeds the {available} labelled images")
    return sizes


def main(cfg):
    source = load_run_model(cfg.init_from, cfg)  # results/07_reverse_mnist/seed-K/model.pt
    cfg = network_of(cfg, source)                # 07's network; a flag that contradicts it is refused
    if not cfg.sweep:
        return train_and_test(cfg, source, init_from=str(source[1]))
    rows, points = [], run_dir(cfg).parent / "sweep"
    for size in sweep_sizes(cfg):
        for arm in ("fine-tuned", "scratch"):   # 2 models per size, differing only in the start and its lr
            point = dataclasses.replace(resolve(cfg), name=f"{arm}-{size}", sweep=False, quick=False, train_subset=size,
                                        results_dir=str(points), overrides="",
                                        lr=cfg.lr if arm == "fine-tuned" else cfg.scratch_lr)
            metrics = (train_and_test(point, source, init_from=str(source[1])) if arm == "fine-tuned" else
                       train_and_test(point))
            if metrics:  # rank 0 collects
                rows.append(dict(labels=size, labels_used=metrics["labels_used"], start=arm, lr=point.lr,
                                 test=metrics["test"]))
    write_sweep(cfg, rows, points / f"seed-{cfg.seed}")


if __name__ == "__main__":
    launch(main, cli(CONFIG))
