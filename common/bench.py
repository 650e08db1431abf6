"""python -m common.bench: the project's data pipeline and training step against the conventional ones,
side by side in one run, on the same images, the same cores and the same model.

conventional  what a user would pick instead: a torchvision-style dataset holding uint8 images in memory,
              per-image torchvision.transforms.v2 in a DataLoader with one worker per core, pinned memory
              on CUDA, and the same autocast precision + channels_last model as ours.
writeup       the writeup's style, kept as a second baseline: per-image PIL transforms, fp32, NCHW.
ours          uint8 data on the device, augmentation of whole batches as tensor ops, autocast where native,
              channels_last, freed memory kept mapped (keep_freed_memory).
Every row: median of --repeats timings after a warm-up; ratio > 1 means ours is better; per-core figures
divide by the cores both sides were given. Ratios mean something only on an idle machine: the bench
measures what other processes use before and after, and says so when they load the CPU.
"""
import argparse
import dataclasses
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import deform_conv2d
from torchvision.transforms import v2

from .augment import deformable_convolution, deformable_taps
from .config import AUGMENT_04, AUGMENT_FIELDS, CROSS_DOMAIN, Config, Parser
from .errors import UserError
from .models import build_model, flops_per_image, resnet18
from .plumbing import keep_freed_memory, write_json
from .lifecycle import environment, pick_device, pick_precision
from .training import (autocast, batches, grad_scaler, loss_function, make_optimizer, to_input,
                    train_step)

STACK = Config(**AUGMENT_04)
RECIPE_07 = Config(dataset="mnist", label_smoothing=0.1, **(AUGMENT_04 | CROSS_DOMAIN))  # 07's step, sizes aside


def dg_stack():
    """07's augmentation: 04's stack plus the cross-domain preset (config.CROSS_DOMAIN, which 07 uses)."""
    return Config(**{k: getattr(RECIPE_07, k) for k in AUGMENT_FIELDS + ("prorandconv_layers",)})


def dg_extras(cfg):
    """What 07's augmentation sets differently from 04's stack: the cross-domain views, and the warp it drops."""
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in AUGMENT_FIELDS if getattr(cfg, k) != getattr(STACK, k))


def deformable_inputs(images):
    """One Pro-RandConv layer's inputs for a batch, for ours and for torchvision's deform_conv2d with per-image
    groups (the batch as one image of B x C channels)."""
    b, c, h, w = images.shape
    g = torch.Generator(device=images.device).manual_seed(0)
    x = images.float() / 255
    offsets = torch.randn(b, 18, h, w, generator=g, device=images.device) * 0.1
    weights = torch.randn(b, c, c, 3, 3, generator=g, device=images.device)
    grouped = (x.reshape(1, b * c, h, w), offsets.reshape(1, b * 18, h, w), weights.reshape(b * c, c, 3, 3))
    return x, deformable_taps(offsets, h, w), weights, (*grouped, None, 1, 1)  # bias None, stride 1, padding 1


def v2_transform(cfg):
    """04's stack as torchvision.transforms.v2 on uint8 tensors, one image at a time (the conventional way)."""
    return v2.Compose([
        v2.RandomAffine(cfg.rotate, translate=(cfg.translate,) * 2, shear=cfg.shear),
        v2.RandomResizedCrop(32, scale=(1 - cfg.crop_scale, 1), antialias=True),
        v2.RandomPerspective(2 * cfg.perspective, p=1.0),
        v2.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter),
        v2.ToDtype(torch.float32, scale=True)])


def pil_transform(cfg):
    """The writeup's per-image stack at 04's strengths (torchvision v1 transforms on PIL images)."""
    return T.Compose([T.ToPILImage(), T.RandomAffine(cfg.rotate, translate=(cfg.translate,) * 2, shear=cfg.shear),
                      T.RandomResizedCrop(32, scale=(1 - cfg.crop_scale, 1), antialias=True),
                      T.RandomPerspective(2 * cfg.perspective, p=1.0), T.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter),
                      T.ToTensor()])


class PerImage(Dataset):
    """What a torchvision dataset does per item: one stored uint8 image -> transform -> float tensor."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def timed(fn, repeats, sync):
    fn()  # warm-up: allocator, oneDNN/cuDNN kernel choice, worker start
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_busy():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def others_load(seconds=1.0):
    """Cores' worth of CPU that other processes use while this one sleeps (0 on an idle machine)."""
    try:
        busy0, total0 = cpu_busy()
        time.sleep(seconds)
        busy1, total1 = cpu_busy()
    except OSError:
        return None
    return (busy1 - busy0) / max(1, total1 - total0) * os.cpu_count()


def train_steps(model, images, labels, batch_size, precision, channels_last):
    """One pass of SGD steps over the images; returns the summed loss (the same images on every side)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    total = 0.0
    for xb, yb in batches(images, labels, batch_size):
        inputs = to_input(xb) if channels_last else xb.float() / 255
        with autocast(images.device, precision):
            loss = F.cross_entropy(model(inputs).float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


def matmul_rate(device, precision, size=2048, repeats=5, sync=lambda: None):
    """The device's measured matrix-multiply rate (FLOP/s) in `precision` (autocast, as a run computes): the
    ceiling a convolution network's step can approach."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    with autocast(device, precision):
        seconds = timed(lambda: a @ b, repeats, sync)
    return 2 * size ** 3 / seconds


def recipe_step(s, steps=3):
    """07's training step exactly as fit() runs it (train.train_step: two views, the recipe's augmentation, JSD,
    clipping, the update), in the precision a run picks: (images/s, its FLOP/s, the matmul FLOP/s)."""
    cfg = dataclasses.replace(RECIPE_07, width=s.width, batch_size=s.batch_size)
    model = build_model(cfg, [0.5] * 3, [0.2] * 3).to(s.device, memory_format=torch.channels_last)
    flops = 3 * flops_per_image(model) * cfg.views * cfg.batch_size  # backward ~ twice the forward
    optimizer, scaler, loss_fn = make_optimizer(cfg, model), grad_scaler(s.device, s.precision), loss_function(cfg)
    xb, yb = s.on_device[0][:cfg.batch_size], s.on_device[1][:cfg.batch_size]
    model.train()

    def run_steps():
        for key in range(steps):
            loss, _ = train_step(model, optimizer, scaler, cfg, xb, yb, key, loss_fn, s.precision)
        loss.item()
    seconds = s.timed(run_steps) / steps
    return cfg.batch_size / seconds, flops / seconds, matmul_rate(s.device, s.precision, sync=s.sync)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


MAX_IMAGES = 100_000  # 300 MB of uint8 images, each row timed several times: beyond that the bench only waits
OFFICIAL_SIZES = (73257, 26032, 60000, 10000)  # SVHN train, test; MNIST train, test


def hold_datasets(scale):
    """Run in a fresh process: the four datasets at their official sizes (1/scale of them). Returns the bytes
    torchvision's datasets keep (uint8: SVHN 3x32x32, MNIST 28x28), the bytes of ours (uint8 3x32x32, MNIST
    resized to 32x32 and its grey stored once), and the process RSS holding ours."""
    sizes = [max(1, n // scale) for n in OFFICIAL_SIZES]
    ours = [torch.ones(n, 3, 32, 32, dtype=torch.uint8) for n in sizes[:2]]
    ours += [torch.ones(n, 1, 32, 32, dtype=torch.uint8).expand(-1, 3, -1, -1) for n in sizes[2:]]
    ours_bytes = sum(t.untyped_storage().nbytes() for t in ours)
    torchvision_bytes = sum(n * 3 * 32 * 32 for n in sizes[:2]) + sum(n * 28 * 28 for n in sizes[2:])
    return torchvision_bytes, ours_bytes, rss_bytes()


def memory_row(scale):
    """Measured in a spawned process: this one holds the models and the DataLoader's leftovers."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        torchvision_bytes, ours, rss = pool.apply(hold_datasets, (scale,))
    return torchvision_bytes / 2**20, ours / 2**20, rss / 2**20


def model_flops():
    """Forward GFLOPs per 32x32 image of each network the experiments build (counted, not estimated)."""
    counts = {"resnet18 (01-04, 06-08)": flops_per_image(build_model(Config(), [0.5] * 3, [0.2] * 3))}
    for transfer_input in ("upsample64", "upsample224", "stem3x3"):
        model = build_model(Config(arch="imagenet_resnet18", transfer_input=transfer_input), [0.5] * 3, [0.2] * 3,
                            pretrained=False)
        counts[f"imagenet_resnet18 {transfer_input} (05)"] = flops_per_image(model)
    return {k: v / 1e9 for k, v in counts.items()}


@dataclass
class Setup:
    """What every timing of one bench run shares: device, cores, the same images and initial weights."""
    device: torch.device
    precision: str
    cores: int
    batch_size: int
    repeats: int
    width: int
    workers: int
    data: torch.Tensor          # uint8 images on the host (the DataLoader sides read them there)
    labels: torch.Tensor
    on_device: tuple            # the same images and labels on the device (our side)
    init: dict                  # one initial state dict for every model

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats=None):
        return timed(fn, repeats or self.repeats, self.sync)

    def fresh(self, channels_last):
        model = resnet18(width=self.width)
        model.load_state_dict(self.init)
        return model.to(self.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def loader(self, transform):
        return DataLoader(PerImage(self.data, self.labels, transform), batch_size=self.batch_size, shuffle=True,
                          drop_last=True, num_workers=self.workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=self.workers > 0)

    @property
    def step_images(self):
        return min(len(self.data), 4 * self.batch_size)

    @property
    def epoch_images(self):
        return len(self.data) - len(self.data) % self.batch_size


def drain(loader):
    for _ in loader:
        pass


def epoch_from(s, loader, model, precision, channels_last):
    """An augmented epoch fed by a DataLoader (the conventional and the writeup's pipelines)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for xb, yb in loader:
        xb = xb.to(s.device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(s.device, precision):
            loss = F.cross_entropy(model(xb).float(), yb.to(s.device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def epoch_ours(s, model, precision, channels_last):
    """An augmented epoch of ours: uint8 batches on the device, augmented as tensors."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    generator = torch.Generator(device=s.device).manual_seed(0)
    for step, (xb, yb) in enumerate(batches(*s.on_device, s.batch_size, generator)):
        inputs = to_input(xb, STACK, step)
        if not channels_last:
            inputs = inputs.contiguous()
        with autocast(s.device, precision):
            loss = F.cross_entropy(model(inputs).float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def evaluate_all(s, model, precision, channels_last):
    model.eval()
    for xb, _ in batches(*s.on_device, 512):
        with autocast(s.device, precision):
            model(to_input(xb) if channels_last else xb.float() / 255)


def time_baselines(s, models):
    """The baselines first, with glibc's default allocator settings, as a user's script runs them."""
    step_data = s.on_device[0][:s.step_images], s.on_device[1][:s.step_images]
    conventional, writeup = s.loader(v2_transform(STACK)), s.loader(pil_transform(STACK))
    return dict(augment=s.timed(lambda: drain(conventional)), augment_writeup=s.timed(lambda: drain(writeup)),
                train_step=s.timed(lambda: train_steps(models["fp32"], *step_data, s.batch_size, "fp32", False)),
                epoch=s.timed(lambda: epoch_from(s, conventional, models["conventional"], s.precision, True)),
                epoch_writeup=s.timed(lambda: epoch_from(s, writeup, models["writeup"], "fp32", False),
                                      max(1, s.repeats - 1)),
                eval=s.timed(lambda: evaluate_all(s, models["fp32"], "fp32", False)))


def time_ours(s, models):
    """Ours, with what a script's process sets up (keep_freed_memory): this cannot be undone within the process."""
    keep_freed_memory()
    step_data = s.on_device[0][:s.step_images], s.on_device[1][:s.step_images]
    augment_batches = s.on_device[0][:s.epoch_images].split(s.batch_size)
    dg = dg_stack()
    deform_in, deform_grid, deform_weights, grouped_args = deformable_inputs(augment_batches[0])
    return dict(deform_conv2d_grouped=s.timed(lambda: deform_conv2d(*grouped_args)), deformable_images=len(deform_in),
                deformable=s.timed(lambda: deformable_convolution(deform_in, deform_grid, deform_weights)),
                augment=s.timed(lambda: [to_input(b, STACK, i) for i, b in enumerate(augment_batches)]),
                augment_dg=s.timed(lambda: [to_input(b, dg, i) for i, b in enumerate(augment_batches)]),
                train_step=s.timed(lambda: train_steps(models["ours"], *step_data, s.batch_size, s.precision, True)),
                epoch=s.timed(lambda: epoch_ours(s, models["ours"], s.precision, True)),
                epoch_fp32=s.timed(lambda: epoch_ours(s, s.fresh(False), "fp32", False), max(1, s.repeats - 1)),
                eval=s.timed(lambda: evaluate_all(s, models["ours"], s.precision, True)),
                fp32_kept=s.timed(lambda: train_steps(models["fp32"], *step_data, s.batch_size, "fp32", False)))


def make_rows(s, base, ours, compiled=None):
    """The table: (name, what the two sides are, baseline, ours) per row; ratio > 1 means ours is better."""
    n_step, n_epoch, p = s.step_images, s.epoch_images, s.precision
    loader_side = f"DataLoader, {s.workers} worker(s)"
    specs = [
        ("augment", f"04's stack: v2 per image, {loader_side} vs batches of {s.batch_size}", base["augment"], ours["augment"], n_epoch),
        ("augment_writeup", f"04's stack: PIL per image, {loader_side} vs batches of {s.batch_size}",
         base["augment_writeup"], ours["augment"], n_epoch),
        ("augment_dg", f"ours: 04's stack vs 07's (04's with {dg_extras(dg_stack())})",
         ours["augment"], ours["augment_dg"], n_epoch),
        ("deformable_conv", f"one Pro-RandConv layer on {ours['deformable_images']} images: grouped deform_conv2d "
         "(groups = B) vs one grid_sample + einsum", ours["deform_conv2d_grouped"], ours["deformable"], ours["deformable_images"]),
        ("train_step", f"fp32 NCHW vs {p} channels_last, both keeping freed memory", ours["fp32_kept"], ours["train_step"], n_step),
        ("train_step_allocator", f"fp32 NCHW, glibc defaults vs {p} channels_last + keep_freed_memory",
         base["train_step"], ours["train_step"], n_step)]
    if compiled is not None:
        specs.append(("train_step_compiled", f"{p}: not compiled vs torch.compile", ours["train_step"], compiled, n_step))
    specs += [
        ("epoch", f"augmented, both {p} channels_last: v2 {loader_side} vs uint8 on the device (pipeline gain)",
         base["epoch"], ours["epoch"], n_epoch),
        ("epoch_precision", f"ours augmented: fp32 NCHW vs {p} channels_last (precision gain)", ours["epoch_fp32"],
         ours["epoch"], n_epoch),
        ("epoch_writeup", f"augmented: PIL {loader_side}, fp32 NCHW vs ours {p} channels_last", base["epoch_writeup"],
         ours["epoch"], n_epoch),
        ("eval", f"fp32 NCHW vs {p} channels_last", base["eval"], ours["eval"], len(s.data))]
    return [dict(name=name, detail=detail, baseline=n / t_base, ours=n / t_ours, unit="images/s", ratio=t_base / t_ours,
                 baseline_per_core=n / t_base / s.cores, ours_per_core=n / t_ours / s.cores)
            for name, detail, t_base, t_ours, n in specs]


def setup(device, batch_size, images, repeats, quick):
    device = pick_device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (images,))
    width = 16 if quick else 64
    return Setup(device, pick_precision("auto", device), cores, batch_size, repeats, width, 0 if quick else cores,
                 data, labels, (data.to(device), labels.to(device)), resnet18(width=width).state_dict())


def bench(device="auto", batch_size=128, images=1024, repeats=3, quick=False, compile=False):
    s = setup(device, batch_size, images, repeats, quick)
    load_before = others_load(0.2 if quick else 1.0)
    models = dict(fp32=s.fresh(False), conventional=s.fresh(True), writeup=s.fresh(False), ours=s.fresh(True))
    base = time_baselines(s, models)
    ours = time_ours(s, models)
    compiled = None
    if compile:
        model = torch.compile(s.fresh(True))
        step_data = s.on_device[0][:s.step_images], s.on_device[1][:s.step_images]
        compiled = s.timed(lambda: train_steps(model, *step_data, s.batch_size, s.precision, True))
    rows = make_rows(s, base, ours, compiled)
    recipe_images, recipe_flops, matmul_flops = recipe_step(s)
    torchvision_mb, ours_mb, rss_mb = memory_row(scale=100 if quick else 1)
    rows.append(dict(name="memory", detail="4 datasets held: torchvision's uint8 (MNIST 28x28) vs ours uint8 (MNIST "
                     "32x32, grey once)", baseline=torchvision_mb, ours=ours_mb, unit="MiB", ratio=torchvision_mb / ours_mb,
                     baseline_per_core=None, ours_per_core=None))
    dg_cost = (ours["augment_dg"] / s.epoch_images) / (ours["train_step"] / s.step_images)
    return dict(device=str(s.device), device_name=environment(s.device, "")["device_name"], precision=s.precision,
                images=len(s.data), dg_augment_share_of_train_step=dg_cost, dg_augmentation=dg_extras(dg_stack()),
                batch_size=s.batch_size, cores=s.cores, threads=torch.get_num_threads(), process_rss_mib=rss_mb,
                others_load_before=load_before, others_load_after=others_load(0.2 if quick else 1.0),
                flops_g=model_flops(), rows=rows,
                recipe_step=dict(images_per_s=recipe_images, gflops=recipe_flops / 1e9, matmul_gflops=matmul_flops / 1e9,
                                 share_of_matmul=recipe_flops / matmul_flops, width=s.width, batch_size=s.batch_size))


def table(result):
    lines = [f"device: {result['device_name']} ({result['device']}, {result['cores']} cores, {result['precision']}); "
             f"{result['images']} images, batch {result['batch_size']}; baseline = conventional unless named",
             f"{'':22} {'baseline':>10} {'ours':>10} {'unit':>9} {'ratio':>7}  {'per core':>19}   sides"]
    for r in result["rows"]:
        per_core = (f"{r['baseline_per_core']:8.1f} / {r['ours_per_core']:8.1f}" if r["baseline_per_core"] is not None
                    else "")
        lines.append(f"{r['name']:22} {r['baseline']:10.1f} {r['ours']:10.1f} {r['unit']:>9} {r['ratio']:6.1f}x  "
                     f"{per_core:>19}   {r['detail']}")
    lines.append(f"RSS of a fresh process (torch and the project imported) holding our four datasets: "
                 f"{result['process_rss_mib']:.0f} MiB")
    lines.append(f"the DG augmentation (07's: 04's stack with {result['dg_augmentation']}) per image costs "
                 f"{100 * result['dg_augment_share_of_train_step']:.1f}% of a train step's time")
    step = result["recipe_step"]
    lines.append(f"07's training step as fit() runs it (width {step['width']}, batch {step['batch_size']}, two views, "
                 f"{result['precision']}): {step['images_per_s']:.1f} images/s, {step['gflops']:.1f} GFLOP/s = "
                 f"{100 * step['share_of_matmul']:.0f}% of this device's measured {result['precision']} matmul rate "
                 f"({step['matmul_gflops']:.0f} GFLOP/s)")
    lines.append("forward GFLOPs per image: " + ", ".join(f"{k} {v:.2f}" for k, v in result["flops_g"].items()))
    loads = [v for v in (result["others_load_before"], result["others_load_after"]) if v is not None]
    if loads:
        busiest = max(loads)
        lines.append(f"other processes used {busiest:.2f} of {os.cpu_count()} cores around the bench"
                     + (": NOT an idle machine, these ratios are not meaningful; rerun when it is idle"
                        if busiest > 0.25 else " (idle)"))
    return "\n".join(lines)


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    parser.add_argument("--batch-size", type=int, help="(default: 128; --quick: 32)")
    parser.add_argument("--images", type=int, help=f"synthetic SVHN-shaped images, at most {MAX_IMAGES:,} "
                        "(default: 1024; --quick: 64)")
    parser.add_argument("--repeats", type=int, help="timings per row; the median is shown (default: 3; --quick: 1)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd train step")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the code, not the speed")
    parser.add_argument("--json", help="also save the table as JSON here")
    args = parser.parse_args(argv)
    for flag, (full, quick) in dict(batch_size=(128, 32), images=(1024, 64), repeats=(3, 1)).items():
        if getattr(args, flag) is None:  # --quick fills in only what was not passed
            setattr(args, flag, quick if args.quick else full)
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.images > MAX_IMAGES:
        parser.error(f"--images {args.images}: at most {MAX_IMAGES:,} (they are held in memory, and timed {args.repeats}x)")
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} must be at least --batch-size {args.batch_size}: an epoch needs a full batch")
    if args.json:  # before minutes of timing, not after
        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            sys.exit(f"error: cannot write --json {args.json}: its folder is missing or not writable, or it is a folder")
    try:
        result = bench(args.device, args.batch_size, args.images, args.repeats, args.quick, args.compile)
    except UserError as e:
        sys.exit(f"error: {e}")  # a module of its own, not a run: the same one line, exit 1
    print(table(result))
    if args.json:
        try:
            write_json(args.json, result)
        except OSError as e:
            sys.exit(f"error: cannot write --json {args.json} ({e.strerror or type(e).__name__})")


if __name__ == "__main__":
    main()
