"""The one block of knobs every experiment shares, and the CLI derived from it."""
import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user can fix (bad flag value, missing file): printed as one line, exit 1."""


@dataclass(frozen=True)
class Config:
    name: str = "01_base"           # results/<name>/ ; equals the script's file stem
    # data
    dataset: str = "svhn"           # training set: svhn | mnist (MNIST is resized to 3x32x32)
    data_dir: str = "data"          # torchvision layout: D/train_32x32.mat, D/MNIST/raw/*-ubyte
    results_dir: str = "results"    # runs go to <results-dir>/<name>/seed-<seed>/
    val_fraction: float = 0.05      # carved from train with a fixed seed; the only set that picks an epoch
    train_subset: int = 0           # >0: seeded stratified subset of the training split (CPU runs); alias --subset-size
    eval_subset: int = 0            # >0: stratified cap on val and test sets, for smoke runs only
    # model
    arch: str = "resnet18"          # resnet18 (32x32 stem, ours) | imagenet_resnet18 (torchvision's, ImageNet weights)
    pretrained: bool = True         # imagenet_resnet18: ImageNet weights; --no-pretrained = same adapter, random init (05's control)
    norm: str = "batch"             # batch | none: the variable of 02
    input_norm: str = "dataset"     # dataset (train-set mean/std) | image (each image by its own: no brightness/contrast cue)
    width: int = 64                 # channels of the first stage; 64 is ResNet-18, tests shrink it for speed
    transfer_input: str = "upsample64"  # imagenet_resnet18 only: upsample64 | upsample224 | stem3x3 (see models.py)
    weights: str = ""               # imagenet_resnet18: a state-dict file; empty = torchvision's cache (download if online)
    init_from: str = ""             # an experiment whose seed-matched model.pt initializes this run (08 <- 07)
    inherit_best: bool = False      # take the recipe of the 01-06 run with the best validation accuracy (07)
    inherited_from: str = ""        # filled in by inherit_best: which run the recipe came from and why
    overrides: str = ""             # filled in by cli(): the fields given on the command line, comma-separated
    # optimization
    epochs: int = 15                # enough for the one-cycle schedule to converge on full SVHN
    batch_size: int = 128
    optimizer: str = "sgd"          # sgd (Nesterov) | adamw
    lr: float = 0.1                 # peak of the one-cycle schedule
    momentum: float = 0.9           # SGD momentum, constant (the schedule moves only the lr)
    weight_decay: float = 5e-4      # applied to every parameter; 5e-4 is the usual value for ResNets on 32x32 digits
    warmup: float = 0.2             # fraction of all steps spent ramping the lr up (OneCycle pct_start)
    label_smoothing: float = 0.0    # epsilon of torch's CrossEntropyLoss (03)
    scratch_lr: float = 0.1         # 08 --sweep: peak lr of the from-scratch arm (01's: nothing pretrained to protect)
    # augmentation (04); all zero = off
    rotate: float = 0.0             # max rotation, degrees
    shear: float = 0.0              # max shear, degrees
    translate: float = 0.0          # max shift, fraction of the image size
    crop_scale: float = 0.0         # resized crop keeps an area in [1 - crop_scale, 1]
    perspective: float = 0.0        # max corner displacement, fraction of the image size
    jitter: float = 0.0             # brightness, contrast and saturation factors in [1 - j, 1 + j]
    invert: float = 0.0             # probability of inverting an image: SVHN digits come in both polarities, MNIST's never
    randconv: float = 0.0           # probability of a random-convolution view (RandConv): new textures and colours, same shapes
    prorandconv: float = 0.0        # probability of a progressive random-convolution view (Pro-RandConv): stacked 3x3 random blocks
    prorandconv_layers: int = 10    # Pro-RandConv's L ~ U{1..this}: more layers, larger and stranger textures (the paper's digit value)
    consistency: float = 0.0        # weight of the Jensen-Shannon consistency across augmented views (AugMix); 0 = one view, no extra cost
    views: int = 2                  # augmented views per image when --consistency > 0: each extra view costs one more forward/backward
    tta: str = "none"               # none | bn | tent | bn,tent: test-time adaptation to the unlabelled cross-domain test set, reported apart (test_tta)
    # runtime
    seed: int = 0                   # model init, batch order and augmentation; the val split stays fixed
    device: str = "auto"            # auto | cpu | cuda
    amp: str = "auto"               # auto: bf16 on native hardware (CUDA >= 8.0, CPUs with AVX512-BF16/AMX), fp16 + GradScaler on older CUDA, else fp32 | bf16 | fp16 | off
    deterministic: bool = False     # deterministic kernels, cuDNN autotuning off: exact resume on CUDA (CPU is exact anyway)
    sync_bn: bool = True            # under torchrun on CUDA: one set of BatchNorm statistics across ranks (CPU/gloo: per rank)
    compile: bool = False           # torch.compile the model (slow start; see README Speed)
    quick: bool = False             # smoke profile: 256 images, 1 epoch, under <results-dir>/quick/
    resume: bool = False            # continue the interrupted run of this config from its checkpoint
    restart: bool = False           # discard an interrupted run's saved epochs and start over (never done unasked)
    sweep: bool = False             # 08: label-efficiency sweep, fine-tuned vs from scratch
    sweep_sizes: str = "100,300,1000,3000,10000"  # labelled-subset sizes of the sweep

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a config written in code gets the checks the CLI's parsing gives
            value = getattr(self, f.name)
            if f.type is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise UserError(f"--{flag(f.name)} must be a finite number, got {value!r}")
        choices = dict(dataset=("svhn", "mnist"), arch=("resnet18", "imagenet_resnet18"), norm=("batch", "none"),
                       input_norm=("dataset", "image"),
                       transfer_input=("upsample64", "upsample224", "stem3x3"), optimizer=("sgd", "adamw"),
                       device=("auto", "cpu", "cuda"), amp=("auto", "bf16", "fp16", "off"), tta=("none", "bn", "tent", "bn,tent"))
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{flag(key)} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise UserError(f"--name must be a plain folder name (letters, digits, _ . -), got {self.name!r}")
        for key in ("epochs", "batch_size", "lr", "scratch_lr", "width", "warmup", "prorandconv_layers", "views"):
            if not getattr(self, key) > 0:
                raise UserError(f"--{flag(key)} must be > 0, got {getattr(self, key)}")
        for key in ("seed", "train_subset", "eval_subset", "weight_decay", "consistency", "rotate", "shear", "translate",
                    "crop_scale", "perspective", "jitter", "invert"):
            if getattr(self, key) < 0:
                raise UserError(f"--{flag(key)} must be >= 0, got {getattr(self, key)}")
        for key in ("warmup", "momentum", "label_smoothing", "crop_scale", "jitter", "invert", "randconv", "prorandconv"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"--{flag(key)} must be in [0, 1), got {getattr(self, key)}")
        limits = dict(seed=(2**31 - 1, "it seeds numpy too"), rotate=(180, "degrees"), shear=(60, "degrees"),
                      translate=(0.5, "of the image size"), perspective=(0.5, "of the image size"),
                      width=(1024, "channels"), prorandconv_layers=(50, "layers"), views=(8, "views"))
        for key, (most, unit) in limits.items():
            if getattr(self, key) > most:
                raise UserError(f"--{flag(key)} must be at most {most} ({unit}), got {getattr(self, key)}")
        if not 0 < self.val_fraction <= 0.5:
            raise UserError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction}: epochs are chosen on "
                            "validation, never on test, and most labelled images should train")
        if self.consistency and self.views < 2:
            raise UserError(f"--consistency compares augmented views: it needs --views >= 2, got {self.views}")
        if self.consistency and not self.augments:
            raise UserError("--consistency compares augmented views, and no augmentation is on: identical views")
        if self.tta != "none" and self.norm == "none" and self.arch == "resnet18":
            raise UserError(f"--tta {self.tta} adapts BatchNorm layers: it needs --norm batch")
        if self.resume and self.restart:
            raise UserError("--resume continues the saved run and --restart discards it: pass one of them")
        try:
            self.sizes
        except ValueError:
            raise UserError(f"--sweep-sizes must be comma-separated positive integers, got {self.sweep_sizes!r}")

    @property
    def sizes(self):
        sizes = [int(s) for s in self.sweep_sizes.split(",")]
        if not sizes or min(sizes) <= 0:
            raise ValueError(self.sweep_sizes)
        return sizes

    @property
    def augments(self):
        return any(getattr(self, k) > 0 for k in AUGMENT_FIELDS)


AUGMENT_FIELDS = ("rotate", "shear", "translate", "crop_scale", "perspective", "jitter", "invert", "randconv",
                  "prorandconv")
# What 07 copies from the best earlier run: how the network is built and trained. Not the data, and not
# the cross-domain choices (input_norm, invert, randconv, prorandconv), which 01-06 on SVHN cannot rank.
RECIPE_FIELDS = ("arch", "norm", "width", "transfer_input", "weights", "optimizer", "lr", "momentum",
                 "weight_decay", "warmup", "label_smoothing", "batch_size", "rotate", "shear", "translate",
                 "crop_scale", "perspective", "jitter")
ALIASES = {"train_subset": ["--subset-size"]}


def flag(field_name):
    return field_name.replace("_", "-")


def _field_comments():
    """The why-comment after each field above, reused as its --help text (one source of truth)."""
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        match = re.match(r"\s+(\w+): \w+ = .*?#\s*(.*)$", line)
        if match:
            comments[match[1]] = match[2]
    return comments


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is the error and one line pointing at --help, not the whole usage."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once
            sys.stderr.write(f"{self.prog}: error: {message}\nsee `{self.prog} --help`\n")
        sys.exit(2)


def parse_number(kind):
    """int or float of a field's annotation; floats must be finite (nan and inf never make a valid run)."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid float value"
    return parse


HIDDEN = ("inherited_from", "overrides")  # filled in by cli(), not flags


def cli(config, argv=None):
    """Parse flags over a script's CONFIG: only flags that were passed override it."""
    main = sys.modules.get("__main__")
    parser = Parser(description=getattr(main, "__doc__", None), formatter_class=argparse.RawDescriptionHelpFormatter,
                    argument_default=argparse.SUPPRESS)
    comments = _field_comments()
    for f in dataclasses.fields(Config):
        if f.name in HIDDEN:
            continue
        default = getattr(config, f.name)
        names = [f"--{flag(f.name)}"] + ALIASES.get(f.name, [])
        help_text = f"{comments.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        if f.type is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:  # the annotation, not the default's type: rotate=15 in a script still takes --rotate 12.5
            kind = parse_number(f.type) if f.type in (int, float) else f.type
            parser.add_argument(*names, dest=f.name, type=kind, metavar=f.name.upper(), help=help_text)
    passed = vars(parser.parse_args(argv))
    name = passed.get("name", config.name)
    if name != config.name and re.match(r"\d\d_", name):
        parser.error(f"--name {name}: NN_* names belong to the numbered scripts; this is {config.name}")
    try:
        resolved = dataclasses.replace(config, **passed, overrides=",".join(sorted(passed)))
        if resolved.inherit_best:
            from .results import best_recipe
            recipe, source = best_recipe(resolved)
            recipe = {k: v for k, v in recipe.items() if k not in passed}  # flags on the command line win
            resolved = dataclasses.replace(resolved, **recipe, inherited_from=source)
    except UserError as e:
        parser.error(str(e))
    return resolved
