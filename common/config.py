"""The one block of knobs every experiment shares, and the CLI derived from it.

A script that needs knobs of its own (07's recipe inheritance, 08's sweep) subclasses Config in its own
file; cli() builds the parser from whichever class it is given. The parser does no I/O.
"""
import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# 04's augmentation strengths, shared by 04, 07, 08, 09 and the bench (one place).
AUGMENT_04 = dict(
    rotate=15,        # degrees: house numbers are photographed a little tilted, never upside down
    shear=10,         # degrees
    translate=0.1,    # SVHN crops are not centred exactly on the digit
    crop_scale=0.25,  # keep 75-100% of the area: a tighter crop still shows the digit whole
    perspective=0.15, # street-view photos are taken at an angle
    jitter=0.3,       # brightness, contrast, saturation: lighting varies from house to house
)

# 07's cross-domain recipe, each part chosen on the dev domains (results/STUDY.md); 07 and the bench read it here,
# over AUGMENT_04 (AUGMENT_04 | CROSS_DOMAIN: where both set a field, this one's value holds).
CROSS_DOMAIN = dict(
    perspective=0.0,         # 04's warp imitates photos taken at an angle; MNIST, MNIST-M and USPS are flat scans:
                             # without it dev MNIST-M +1.75 and dev USPS -0.37, on 3 of 3 seeds (results/round7.md)
    input_norm="image",      # each image by its own mean/std: a new domain's brightness and contrast carry no cue
    background=1.0,          # MNIST's background is always black; MNIST-M's and SVHN's never are. Every cross-domain
                             # view, not half: at weight 1 dev MNIST-M +2.54 on seed 0 (results/round11.md)
    prorandconv=0.75,        # new textures and colours on the same shapes
    amplitude=0.5,           # random low-frequency Fourier amplitudes, phase kept: large areas' colour and contrast
    consistency=1.0,         # JSD between a clean view (the only one with cross-entropy) and the cross-domain view;
                             # weight 1, not 5, with every view cluttered: dev USPS 99.41 against 98.80 on 3 seeds
                             # (results/round11.md, STUDY.md sections 15-16)
    consistency_clean=True,  # the clean view: every seed learns the digits from its first steps
    consistency_geometry="shared",  # the views differ only in what crosses domains (AugMix); dev MNIST-M up on 3 of 3 seeds
    dg_ramp=0.2,             # the cross-domain view ramps in over the first fifth of the steps
    clip_grad=1.0,           # the first steps on strange textures otherwise swing the weights far
    decay_norm_bias=False,   # weight decay on the convolution and linear weights only
)


@dataclass(frozen=True)
class Config:
    name: str = "01_base"           # results/<name>/ ; equals the script's file stem
    # data
    dataset: str = "svhn"           # training set: svhn | mnist (MNIST is resized to 3x32x32)
    data_dir: str = "data"          # torchvision layout: D/train_32x32.mat, D/MNIST/raw/*-ubyte, D/USPS, D/mnist_m
    results_dir: str = "results"    # runs go to <results-dir>/<name>/seed-<seed>/
    val_fraction: float = 0.05      # carved from train with a fixed seed; the only set that picks an epoch
    train_subset: int = 0           # >0: seeded stratified subset of the training split (CPU runs); alias --subset-size
    eval_subset: int = 0            # >0: stratified cap on val, dev and test sets, for smoke runs only
    # model
    arch: str = "resnet18"          # resnet18 (32x32 stem, ours) | imagenet_resnet18 (torchvision's, ImageNet weights)
    pretrained: bool = True         # imagenet_resnet18: ImageNet weights; --no-pretrained = same adapter, random init (05's control)
    norm: str = "batch"             # batch | none: the variable of 02
    input_norm: str = "dataset"     # dataset (train-split mean/std) | image (each image by its own: no brightness/contrast cue) | edges (gradient magnitude: no colour, no polarity)
    width: int = 64                 # channels of the first stage; 64 is ResNet-18, tests shrink it for speed
    ibn: float = 0.0                # >0: IBN-Net-a (Pan et al., ECCV 2018): this fraction of each block's first norm instance-normalized, stages 1-3 (the paper's 0.5)
    transfer_input: str = "upsample64"  # imagenet_resnet18 only: upsample64 | upsample224 | stem3x3 (see models.py)
    weights: str = ""               # imagenet_resnet18: a state-dict file; empty = torchvision's cache (download if online)
    # optimization
    epochs: int = 15                # enough for the one-cycle schedule to converge on full SVHN
    batch_size: int = 128
    optimizer: str = "sgd"          # sgd (Nesterov) | adamw
    lr: float = 0.1                 # peak of the one-cycle schedule
    momentum: float = 0.9           # SGD momentum, constant (the schedule moves only the lr)
    weight_decay: float = 5e-4      # 5e-4 is the usual value for ResNets on 32x32 digits
    decay_norm_bias: bool = True    # weight decay on BatchNorm and bias parameters too; --no-decay-norm-bias: weights only
    clip_grad: float = 0.0          # >0: clip the global gradient norm to this (after unscaling fp16); 0 = off
    warmup: float = 0.2             # fraction of all steps spent ramping the lr up (OneCycle pct_start)
    label_smoothing: float = 0.0    # epsilon of torch's CrossEntropyLoss (03)
    # augmentation
    rotate: float = 0.0             # max rotation, degrees (04: 15)
    shear: float = 0.0              # max shear, degrees
    translate: float = 0.0          # max shift, fraction of the image size
    crop_scale: float = 0.0         # resized crop keeps an area in [1 - crop_scale, 1]
    perspective: float = 0.0        # max corner displacement, fraction of the image size
    jitter: float = 0.0             # brightness, contrast and saturation factors in [1 - j, 1 + j]
    invert: float = 0.0             # probability of inverting an image: SVHN digits come in both polarities, MNIST's never
    background: float = 0.0         # probability of a cluttered background: the digit over a random colour-noise texture (MNIST's is always black)
    randconv: float = 0.0           # probability of a random-convolution view (RandConv): new textures and colours, same shapes
    prorandconv: float = 0.0        # probability of a progressive random-convolution view (Pro-RandConv): stacked 3x3 random blocks
    prorandconv_layers: int = 10    # Pro-RandConv's L ~ U{1..this}: more layers, larger and stranger textures (the paper's digit value)
    prorandconv_per: str = "image"  # image: each image its own random block | batch: one block per mini-batch (the paper)
    prorandconv_offsets: str = "white"  # tap offsets i.i.d. per pixel (white) | a smooth Gaussian random field (field, the paper)
    prorandconv_offset: float = 0.2 # offsets' scale ~ U(0, this) pixels (our reading of the paper's digit bound)
    prorandconv_field: float = 4.0  # --prorandconv-offsets field: correlation length (Gaussian sigma) of the field, pixels
    prorandconv_affine: float = 0.5 # sigma of the random per-channel gain and shift after standardization
    prorandconv_padding: str = "border"  # border: edges repeated, no black frame | zeros: deform_conv2d's padding
    amplitude: float = 0.0          # probability of a random low-frequency Fourier amplitude perturbation, phase kept (AdvFrequency's random variant)
    amplitude_band: float = 0.15    # frequencies perturbed: up to this many cycles per pixel (0.5 is the highest)
    amplitude_scale: float = 0.5    # each perturbed amplitude times exp(this * N(0, 1))
    randconv_per: str = "image"     # image: each image its own kernel | batch: one kernel, the batch clean w.p. 1 - randconv (official)
    dg_output: str = "unit"         # unit: random-conv outputs as made | matched: moved to each clean image's mean/std per channel
    dg_ramp: float = 0.0            # fraction of all steps over which the cross-domain augmentations ramp up from 0 (0 = off)
    consistency: float = 0.0        # weight of a Jensen-Shannon consistency across augmented views, each view its own warp (unlike AugMix) unless --consistency-geometry shared; 0 = one view
    views: int = 2                  # augmented views per image when --consistency > 0: each extra view costs one more forward/backward
    consistency_clean: bool = False # view 0 without the cross-domain augmentations, cross-entropy on it alone, JSD over all
    consistency_dg_ce: bool = False # with --consistency-clean, the cross-domain views' cross-entropy added to the clean view's (RandConv's loss trains every view on its label)
    consistency_fixed_clean: bool = False  # the clean view's prediction a fixed target of the JSD, no gradient (UDA's consistency): it moves only the other views
    consistency_decay: float = 0.0  # the consistency weight falls linearly by this fraction of itself over training (0.8: 5 at the first step, 1 at the last)
    consistency_geometry: str = "independent"  # independent: each view its own warp and colour | shared: one per image, as AugMix
    mixstyle: float = 0.0           # probability per batch of MixStyle after the first two stages: feature statistics mixed across images
    mixstyle_alpha: float = 0.1     # MixStyle's mixing weight ~ Beta(alpha, alpha) (the paper's 0.1)
    swa: float = 0.0                # >0: average the weights over this last fraction of the steps (SWA/SWAD-style, swa_utils)
    # cross-domain
    tta: str = "none"               # none, or a comma list of bn | tent | shot | t3a: test-time adaptation to each unlabelled target set, reported apart
    tent_lr: float = 1e-3           # Tent's SGD lr (momentum 0.9) on the BN affine parameters (Tent's digit setting)
    tent_batch: int = 128           # Tent's and SHOT-IM's batch: each batch is predicted, then one step
    shot_lr: float = 1e-3           # SHOT-IM's SGD lr (momentum 0.9) on the BN affine parameters
    t3a_filter: int = 100           # T3A: supports kept per class (the lowest-entropy ones)
    dev_images: int = 10_000        # cap per dev domain (stratified): a 0.01-point resolution, seconds to evaluate
    # runtime
    seed: int = 0                   # model init, batch order, augmentation and the --train-subset draw; the val split stays fixed
    device: str = "auto"            # auto | cpu | cuda
    amp: str = "auto"               # auto: bf16 on native hardware (CUDA >= 8.0, CPUs with AVX512-BF16/AMX), fp16 + GradScaler on older CUDA, else fp32 | bf16 | fp16 | off
    deterministic: bool = False     # deterministic kernels, cuDNN autotuning off: exact resume on CUDA (CPU is exact anyway)
    sync_bn: bool = True            # under torchrun on CUDA: one set of BatchNorm statistics across ranks (CPU/gloo: per rank)
    compile: bool = False           # torch.compile the model (slow start; see README Speed)
    quick: bool = False             # smoke profile: 256 images, 1 epoch, under <results-dir>/quick/
    resume: bool = False            # continue the interrupted run of this config from its checkpoint
    restart: bool = False           # discard an interrupted run's saved epochs and start over (never done unasked)
    evaluate: str = ""              # a model.pt: test it on every present domain (and --tta), no training; writes <its folder>.evaluation.json
    dev_only: bool = False          # --evaluate on the dev sets alone: choosing a --tta method or its settings sees no test set
    blind: bool = False             # a training run's test row goes to metrics.json only, not to its log or plot titles: a pilot watched as it runs shows no test number
    overrides: str = ""             # not a flag: cli() records the fields given on the command line, comma-separated

    def __post_init__(self):
        check_fields(self)
        check_combinations(self)

    @property
    def augments(self):
        return any(getattr(self, k) > 0 for k in AUGMENT_FIELDS)

    @property
    def passed(self):
        """The fields given on the command line."""
        return set(self.overrides.split(",")) - {""}


AUGMENT_FIELDS = ("rotate", "shear", "translate", "crop_scale", "perspective", "jitter", "invert", "background",
                  "randconv", "prorandconv", "amplitude")
# The cross-domain augmentations: ramped by --dg-ramp, off in a clean view.
DG_FIELDS = ("invert", "background", "randconv", "prorandconv", "amplitude")
TTA_METHODS = ("bn", "tent", "shot", "t3a")

CHOICES = dict(dataset=("svhn", "mnist"), arch=("resnet18", "imagenet_resnet18"), norm=("batch", "none"),
               input_norm=("dataset", "image", "edges"), transfer_input=("upsample64", "upsample224", "stem3x3"),
               optimizer=("sgd", "adamw"), device=("auto", "cpu", "cuda"), amp=("auto", "bf16", "fp16", "off"),
               prorandconv_per=("image", "batch"), randconv_per=("image", "batch"),
               prorandconv_offsets=("white", "field"), prorandconv_padding=("border", "zeros"),
               dg_output=("unit", "matched"), consistency_geometry=("independent", "shared"))
POSITIVE = ("epochs", "batch_size", "lr", "width", "warmup", "prorandconv_layers", "views", "prorandconv_field", "tent_lr",
            "tent_batch", "dev_images", "amplitude_band", "amplitude_scale", "mixstyle_alpha", "shot_lr", "t3a_filter")
NON_NEGATIVE = ("seed", "train_subset", "eval_subset", "weight_decay", "consistency", "rotate", "shear", "translate",
                "crop_scale", "perspective", "jitter", "invert", "clip_grad", "prorandconv_offset", "prorandconv_affine")
FRACTIONS = ("warmup", "momentum", "label_smoothing", "crop_scale", "jitter", "dg_ramp", "swa", "ibn",
             "consistency_decay")
PROBABILITIES = ("invert", "background", "randconv", "prorandconv", "amplitude", "mixstyle")
AT_MOST = dict(seed=(2**31 - 1, "it seeds numpy too"), rotate=(180, "degrees"), shear=(60, "degrees"),
               translate=(0.5, "of the image size"), perspective=(0.5, "of the image size"),
               width=(1024, "channels"), prorandconv_layers=(50, "layers"), views=(8, "views"),
               prorandconv_offset=(4, "pixels"), prorandconv_field=(16, "pixels"),
               amplitude_band=(0.5, "cycles per pixel"), amplitude_scale=(3, "log-gain"))


def adapts_batchnorm(tta):
    """Whether a --tta value adapts BatchNorm layers (every method but t3a, which reads the classifier only)."""
    return bool(set(tta.split(",")) - {"none", "t3a"})


def flag(field_name):
    return "--" + field_name.replace("_", "-")


DG_FLAGS = ", ".join(map(flag, DG_FIELDS))  # the cross-domain flags, named in errors as DG_FIELDS lists them


def check_fields(cfg):
    """Each field alone: a config written in code gets the checks the CLI's parsing gives."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise UserError(f"{flag(f.name)} must be a finite number, got {value!r}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{flag(key)} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.name):
        raise UserError(f"--name must be a plain folder name (letters, digits, _ . -), got {cfg.name!r}")
    rules = ([(k, lambda v: v > 0, "> 0") for k in POSITIVE] + [(k, lambda v: v >= 0, ">= 0") for k in NON_NEGATIVE]
             + [(k, lambda v: 0 <= v < 1, "in [0, 1)") for k in FRACTIONS]
             + [(k, lambda v: 0 <= v <= 1, "in [0, 1]") for k in PROBABILITIES])
    for key, holds, wanted in rules:
        if not holds(getattr(cfg, key)):
            raise UserError(f"{flag(key)} must be {wanted}, got {getattr(cfg, key)}")
    for key, (most, unit) in AT_MOST.items():
        if getattr(cfg, key) > most:
            raise UserError(f"{flag(key)} must be at most {most} ({unit}), got {getattr(cfg, key)}")
    methods = cfg.tta.split(",")
    if cfg.tta != "none" and not (set(methods) <= set(TTA_METHODS) and len(set(methods)) == len(methods)):
        raise UserError(f"--tta must be none or a comma list of {', '.join(TTA_METHODS)} (each once), got {cfg.tta!r}")
    if not 0 < cfg.val_fraction <= 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5], got {cfg.val_fraction}: epochs are chosen on "
                        "validation, never on test, and most labelled images should train")


def check_combinations(cfg):
    """Fields that only make sense together."""
    if cfg.consistency and cfg.views < 2:
        raise UserError(f"--consistency compares augmented views: it needs --views >= 2, got {cfg.views}")
    if cfg.consistency and not cfg.augments:
        raise UserError("--consistency compares augmented views, and no augmentation is on: identical views")
    if cfg.consistency_clean and not (cfg.consistency and any(getattr(cfg, k) for k in DG_FIELDS)):
        raise UserError(f"--consistency-clean anchors JSD on a view without {DG_FLAGS}: it needs --consistency > 0 "
                        "and one of them on")
    if adapts_batchnorm(cfg.tta) and cfg.norm == "none" and cfg.arch == "resnet18":
        raise UserError(f"--tta {cfg.tta} adapts BatchNorm layers: it needs --norm batch")
    if cfg.ibn and not (cfg.arch == "resnet18" and cfg.norm == "batch"):
        raise UserError("--ibn splits the BatchNorm layers of our ResNet: it needs --arch resnet18 --norm batch")
    if cfg.mixstyle and cfg.arch != "resnet18":
        raise UserError("--mixstyle mixes the feature statistics of our ResNet's stages: it needs --arch resnet18")
    if cfg.blind and cfg.evaluate:
        raise UserError("--blind hides a training run's test row; --evaluate prints what it tests: add --dev-only "
                        "to leave the test sets out")
    if cfg.resume and cfg.restart:
        raise UserError("--resume continues the saved run and --restart discards it: pass one of them")
    base = {f.name: f.default for f in dataclasses.fields(Config)}  # Config's, not a script's subclass defaults
    for key in sorted(cfg.passed & set(NEEDS)):
        holds, wanted = NEEDS[key]
        # Back to Config's default is never refused: 07 --consistency 0 needs --no-consistency-clean to be valid.
        if not holds(cfg) and getattr(cfg, key) != base[key]:
            raise UserError(f"{flag(key)} has no effect without {wanted}: drop it, or add that")


PRORANDCONV = lambda cfg: cfg.prorandconv > 0  # noqa: E731 (a table of predicates reads best as lambdas)
IMAGENET = lambda cfg: cfg.arch == "imagenet_resnet18"  # noqa: E731
# A flag passed on the command line that would change nothing is refused, not ignored: field -> (holds, what it needs).
NEEDS = dict(
    views=(lambda cfg: cfg.consistency > 0, "--consistency > 0"),
    consistency_clean=(lambda cfg: cfg.consistency > 0, "--consistency > 0"),
    consistency_fixed_clean=(lambda cfg: cfg.consistency_clean, "--consistency-clean"),
    consistency_dg_ce=(lambda cfg: cfg.consistency_clean, "--consistency-clean"),
    weights=(IMAGENET, "--arch imagenet_resnet18"), transfer_input=(IMAGENET, "--arch imagenet_resnet18"),
    pretrained=(IMAGENET, "--arch imagenet_resnet18"),
    prorandconv_layers=(PRORANDCONV, "--prorandconv > 0"), prorandconv_per=(PRORANDCONV, "--prorandconv > 0"),
    prorandconv_offsets=(PRORANDCONV, "--prorandconv > 0"), prorandconv_offset=(PRORANDCONV, "--prorandconv > 0"),
    prorandconv_affine=(PRORANDCONV, "--prorandconv > 0"), prorandconv_padding=(PRORANDCONV, "--prorandconv > 0"),
    prorandconv_field=(lambda cfg: cfg.prorandconv > 0 and cfg.prorandconv_offsets == "field",
                       "--prorandconv > 0 --prorandconv-offsets field"),
    randconv_per=(lambda cfg: cfg.randconv > 0, "--randconv > 0"),
    dg_output=(lambda cfg: cfg.randconv > 0 or cfg.prorandconv > 0, "--randconv or --prorandconv > 0"),
    dg_ramp=(lambda cfg: any(getattr(cfg, k) > 0 for k in DG_FIELDS), f"one of {DG_FLAGS} > 0"),
    tent_lr=(lambda cfg: "tent" in cfg.tta, "--tta tent"),
    tent_batch=(lambda cfg: {"tent", "shot"} & set(cfg.tta.split(",")), "--tta tent or shot"),
    shot_lr=(lambda cfg: "shot" in cfg.tta, "--tta shot"), dev_only=(lambda cfg: cfg.evaluate != "", "--evaluate"), t3a_filter=(lambda cfg: "t3a" in cfg.tta, "--tta t3a"),
    amplitude_band=(lambda cfg: cfg.amplitude > 0, "--amplitude > 0"),
    amplitude_scale=(lambda cfg: cfg.amplitude > 0, "--amplitude > 0"),
    mixstyle_alpha=(lambda cfg: cfg.mixstyle > 0, "--mixstyle > 0"),
    consistency_geometry=(lambda cfg: cfg.consistency > 0, "--consistency > 0"),
    consistency_decay=(lambda cfg: cfg.consistency > 0, "--consistency > 0"),
)


ALIASES = {"train_subset": ["--subset-size"]}
HIDDEN = ("overrides",)


def field_docs(config_class):
    """{field: (group, why-comment)} from the class source and its bases: the comment after each field is its
    --help text, the `# section` line above it its argparse group (one source of truth)."""
    docs = {}
    for cls in reversed(config_class.__mro__[:-1]):
        group = "script" if cls is not Config else "general"
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # defined where no source can be found (a REPL): flags without help text
            continue
        for line in source.splitlines():
            section = re.fullmatch(r"\s+# (\S.*)", line)
            if section:
                group = section[1]
            match = re.match(r"\s+(\w+): \w+ = .*?(?:#\s*(.*))?$", line)
            if match:
                docs[match[1]] = (group if cls is Config else "this script only", match[2] or "")
    return docs


def assignment_comments(path, opening):
    """{field: comment} of the `field=value,  # why` lines of the block that opens with the line `opening`
    (a script's `CONFIG = ` or a preset's `NAME = dict(`); a comment continued in the same column below it is
    part of it."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, TypeError, ValueError):
        return {}
    comments, last, column = {}, None, None
    for line in lines[next((i + 1 for i, l in enumerate(lines) if l.startswith(opening)), len(lines)):]:
        field = re.match(r"\s+(\w+)=.*?,\s*(?:#\s*(.*))?$", line)
        more = re.fullmatch(r"(\s+)#\s*(.*)", line)
        if line.startswith(")"):
            break
        if field:
            last, column = field[1], line.find("#")
            comments[last] = field[2] or ""
        elif more and last and len(more[1]) == column:
            comments[last] = f"{comments[last]} {more[2]}".strip()
        else:
            last = None
    return {k: v for k, v in comments.items() if v}


def reasons_for(config, script_file):
    """A script's own reason for each value it changes: its CONFIG comment, else the preset's (AUGMENT_04,
    CROSS_DOMAIN) when it took the preset's value."""
    reasons = {}
    for name, preset in (("AUGMENT_04", AUGMENT_04), ("CROSS_DOMAIN", CROSS_DOMAIN)):
        reasons.update({k: why for k, why in assignment_comments(__file__, f"{name} = dict(").items()
                        if getattr(config, k, None) == preset[k]})
    return {**reasons, **assignment_comments(script_file, "CONFIG = ")}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is the error and one line pointing at --help, not the whole usage."""

    def error(self, message):
        # Under torchrun once (rank 0); a stray RANK without torchrun's MASTER_ADDR is not a rank: say it there too.
        if os.environ.get("RANK", "0") == "0" or "MASTER_ADDR" not in os.environ:
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


def add_flag(group, f, help_text):
    names = [flag(f.name)] + ALIASES.get(f.name, [])
    help_text = help_text.replace("%", "%%")
    if f.type is bool:
        group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
    elif f.name in CHOICES:  # shown as {a,b} and checked by argparse
        group.add_argument(*names, dest=f.name, choices=CHOICES[f.name], help=help_text)
    elif f.name == "tta":
        group.add_argument(*names, dest=f.name, metavar="{none," + ",".join(TTA_METHODS) + "}[,...]", help=help_text)
    else:  # the annotation, not the default's type: rotate=15 in a script still takes --rotate 12.5
        kind = parse_number(f.type) if f.type in (int, float) else f.type
        group.add_argument(*names, dest=f.name, type=kind, metavar=f.name.upper(), help=help_text)


def build_parser(config, script=None):
    """Flags in groups; the first group is what this script changes from 01_base, so --help leads with it, each
    with the script's own reason for its value (its CONFIG comment) and 01's value beside the script's.
    `script`: the globals of the script that called cli() (its docstring and file)."""
    script = script or vars(sys.modules.get("__main__", sys))
    parser = Parser(description=script.get("__doc__"), formatter_class=argparse.RawDescriptionHelpFormatter,
                    argument_default=argparse.SUPPRESS, usage="%(prog)s [--flag VALUE ...]  (flags by group below)")
    docs, reasons = field_docs(type(config)), reasons_for(config, script.get("__file__"))
    base = Config()
    fields = [f for f in dataclasses.fields(config) if f.name not in HIDDEN]
    changed = [f for f in fields if f.name not in dataclasses.asdict(base) or
               (f.name != "name" and getattr(config, f.name) != getattr(base, f.name))]
    groups = {}
    if changed:
        groups["changed"] = parser.add_argument_group(f"what {config.name} changes from 01_base (or adds)")
    for f in fields:
        group_name = "changed" if f in changed else docs.get(f.name, ("general", ""))[0]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        value, why = getattr(config, f.name), docs.get(f.name, ("", ""))[1]
        if f in changed and f.name in dataclasses.asdict(base):
            why, default = reasons.get(f.name, why), f"default: {value!r}; 01_base: {getattr(base, f.name)!r}"
        else:
            default = f"default: {value!r}"
        add_flag(groups[group_name], f, f"{why} ({default})".strip())
    return parser


def cli(config, argv=None):
    """Parse flags over a script's CONFIG: only flags that were passed override it (dataclasses.replace)."""
    # The script's docstring and file: the module of its own Config subclass (07, 08), else the caller's (01-06, 09).
    defined_in = sys.modules.get(type(config).__module__)
    script = vars(defined_in) if type(config) is not Config and defined_in else sys._getframe(1).f_globals
    parser = build_parser(config, script)
    passed = vars(parser.parse_args(argv))
    if passed.get("evaluate", None) == "":  # `--evaluate "$MODEL"` with MODEL unset must not train a run instead
        parser.error("--evaluate needs the path of a model.pt, got an empty value")
    name = passed.get("name", config.name)
    if name != config.name and re.match(r"\d\d_", name):
        parser.error(f"--name {name}: NN_* names belong to the numbered scripts; this is {config.name}")
    try:
        return dataclasses.replace(config, **passed, overrides=",".join(sorted(passed)))
    except UserError as e:
        parser.error(str(e))
