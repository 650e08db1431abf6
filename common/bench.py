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
import importlib.util
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import deform_conv2d
from torchvision.transforms import v2

from .augment import deformable_convolution, deformable_taps
from .config import AUGMENT_FIELDS, Config, Parser, UserError
from .models import build_model, flops_per_image, resnet18
from .train import autocast, batches, keep_freed_memory, pick_device, pick_precision, to_input

STACK = Config(rotate=15, shear=10, translate=0.1, crop_scale=0.25, perspective=0.15, jitter=0.3)  # 04's


def dg_stack():
    """07's augmentation, read from its CONFIG (one source of truth): 04's stack plus the cross-domain ones."""
    spec = importlib.util.spec_from_file_location("reverse_mnist", Path(__file__).resolve().parents[1] / "07_reverse_mnist.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return dataclasses.replace(Config(), **{k: getattr(script.CONFIG, k) for k in AUGMENT_FIELDS + ("prorandconv_layers",)})


def dg_extras(cfg):
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


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def bench(device="auto", batch_size=128, images=1024, repeats=3, quick=False, compile=False):
    device = pick_device(device)
    precision = pick_precision("auto", device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if quick:
        images, repeats, batch_size = 64, 1, 32
    load_before = others_load(0.2 if quick else 1.0)
    torch.manual_seed(0)
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (images,))
    on_device = data.to(device), labels.to(device)
    width = 16 if quick else 64
    n_step, epoch_images = min(images, 4 * batch_size), images - images % batch_size
    step_data = on_device[0][:n_step], on_device[1][:n_step]
    generator = torch.Generator(device=device).manual_seed(0)
    init = resnet18(width=width).state_dict()
    workers = 0 if quick else cores

    def fresh(channels_last):
        model = resnet18(width=width)
        model.load_state_dict(init)
        return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def loader(transform):
        return DataLoader(PerImage(data, labels, transform), batch_size=batch_size, shuffle=True, drop_last=True,
                          num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    conventional, writeup = loader(v2_transform(STACK)), loader(pil_transform(STACK))

    def drain(loader_):
        for _ in loader_:
            pass

    def epoch_from(loader_, model, precision_, channels_last):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        for xb, yb in loader_:
            xb = xb.to(device, non_blocking=True)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision_):
                loss = F.cross_entropy(model(xb).float(), yb.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def epoch_ours(model, precision_, channels_last):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        for step, (xb, yb) in enumerate(batches(*on_device, batch_size, generator)):
            inputs = to_input(xb, STACK, step)
            if not channels_last:
                inputs = inputs.contiguous()
            with autocast(device, precision_):
                loss = F.cross_entropy(model(inputs).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.inference_mode()
    def evaluate(model, precision_, channels_last):
        model.eval()
        for xb, _ in batches(*on_device, 512):
            with autocast(device, precision_):
                model(to_input(xb) if channels_last else xb.float() / 255)

    fp32_model, conventional_model, writeup_model, our_model = fresh(False), fresh(True), fresh(False), fresh(True)
    # The baselines first, with glibc's default allocator settings, as a user's script runs ...
    base = dict(augment=timed(lambda: drain(conventional), repeats, sync),
                augment_writeup=timed(lambda: drain(writeup), repeats, sync),
                train_step=timed(lambda: train_steps(fp32_model, *step_data, batch_size, "fp32", False), repeats, sync),
                epoch=timed(lambda: epoch_from(conventional, conventional_model, precision, True), repeats, sync),
                epoch_writeup=timed(lambda: epoch_from(writeup, writeup_model, "fp32", False), max(1, repeats - 1), sync),
                eval=timed(lambda: evaluate(fp32_model, "fp32", False), repeats, sync))
    # ... then ours, with what fit() sets up; this cannot be undone within the process.
    keep_freed_memory(device)
    augment_batches = on_device[0][:epoch_images].split(batch_size)
    dg = dg_stack()
    deform_in, deform_grid, deform_weights, grouped_args = deformable_inputs(augment_batches[0])
    deform_conv2d_grouped = timed(lambda: deform_conv2d(*grouped_args), repeats, sync)
    ours = dict(deformable=timed(lambda: deformable_convolution(deform_in, deform_grid, deform_weights), repeats, sync),
                augment=timed(lambda: [to_input(b, STACK, i) for i, b in enumerate(augment_batches)], repeats, sync),
                augment_dg=timed(lambda: [to_input(b, dg, i) for i, b in enumerate(augment_batches)], repeats, sync),
                train_step=timed(lambda: train_steps(our_model, *step_data, batch_size, precision, True), repeats, sync),
                epoch=timed(lambda: epoch_ours(our_model, precision, True), repeats, sync),
                epoch_fp32=timed(lambda: epoch_ours(fresh(False), "fp32", False), max(1, repeats - 1), sync),
                eval=timed(lambda: evaluate(our_model, precision, True), repeats, sync))
    fp32_kept = timed(lambda: train_steps(fp32_model, *step_data, batch_size, "fp32", False), repeats, sync)

    rows = []

    def row(name, detail, baseline, ours_, unit="images/s", higher_is_better=True):
        ratio = ours_ / baseline if higher_is_better else baseline / ours_
        per_core = unit == "images/s"
        rows.append(dict(name=name, detail=detail, baseline=baseline, ours=ours_, unit=unit, ratio=ratio,
                         baseline_per_core=baseline / cores if per_core else None,
                         ours_per_core=ours_ / cores if per_core else None))

    loader_side = f"DataLoader, {workers} worker(s)"
    row("augment", f"04's stack: v2 per image, {loader_side} vs batches of {batch_size}",
        epoch_images / base["augment"], epoch_images / ours["augment"])
    row("augment_writeup", f"04's stack: PIL per image, {loader_side} vs batches of {batch_size}",
        epoch_images / base["augment_writeup"], epoch_images / ours["augment"])
    row("augment_dg", f"ours: 04's stack vs 07's (+ {dg_extras(dg)}); baseline = ours without them",
        epoch_images / ours["augment"], epoch_images / ours["augment_dg"])
    row("deformable_conv", f"one Pro-RandConv layer on {len(deform_in)} images: grouped deform_conv2d (groups = B) "
        "vs one grid_sample + einsum", len(deform_in) / deform_conv2d_grouped, len(deform_in) / ours["deformable"])
    row("train_step", f"fp32 NCHW vs {precision} channels_last, both keeping freed memory",
        n_step / fp32_kept, n_step / ours["train_step"])
    row("train_step_allocator", f"fp32 NCHW, glibc defaults vs {precision} channels_last + keep_freed_memory",
        n_step / base["train_step"], n_step / ours["train_step"])
    if compile:
        compiled = torch.compile(fresh(True))
        t_comp = timed(lambda: train_steps(compiled, *step_data, batch_size, precision, True), repeats, sync)
        row("train_step_compiled", f"{precision}: not compiled vs torch.compile", n_step / ours["train_step"], n_step / t_comp)
    row("epoch", f"augmented, both {precision} channels_last: v2 {loader_side} vs uint8 on the device (pipeline gain)",
        epoch_images / base["epoch"], epoch_images / ours["epoch"])
    row("epoch_precision", f"ours augmented: fp32 NCHW vs {precision} channels_last (precision gain)",
        epoch_images / ours["epoch_fp32"], epoch_images / ours["epoch"])
    row("epoch_writeup", f"augmented: PIL {loader_side}, fp32 NCHW vs ours {precision} channels_last",
        epoch_images / base["epoch_writeup"], epoch_images / ours["epoch"])
    row("eval", f"fp32 NCHW vs {precision} channels_last", images / base["eval"], images / ours["eval"])
    torchvision_mb, ours_mb, rss_mb = memory_row(scale=100 if quick else 1)
    row("memory", "4 datasets held: torchvision's uint8 (MNIST 28x28) vs ours uint8 (MNIST 32x32, grey once)",
        torchvision_mb, ours_mb, "MiB", higher_is_better=False)
    load_after = others_load(0.2 if quick else 1.0)
    dg_cost = (ours["augment_dg"] / epoch_images) / (ours["train_step"] / n_step)
    return dict(device=str(device), device_name=_device_name(device), precision=precision, images=images,
                dg_augment_share_of_train_step=dg_cost, dg_augmentation=dg_extras(dg),
                batch_size=batch_size, cores=cores, threads=torch.get_num_threads(), process_rss_mib=rss_mb,
                others_load_before=load_before, others_load_after=load_after, flops_g=model_flops(), rows=rows)


def _device_name(device):
    from .results import environment
    return environment(device, "")["device_name"]


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
    lines.append(f"the DG augmentation (07's: 04's stack + {result['dg_augmentation']}) per image costs "
                 f"{100 * result['dg_augment_share_of_train_step']:.1f}% of a train step's time")
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
    parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    parser.add_argument("--images", type=int, default=1024, help="synthetic SVHN-shaped images (default: 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per row; the median is shown (default: 3)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd train step")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the code, not the speed")
    parser.add_argument("--json", help="also save the table as JSON here")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "images", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.images < args.batch_size and not args.quick:
        parser.error(f"--images {args.images} must be at least --batch-size {args.batch_size}: an epoch needs a full batch")
    if args.json:  # before minutes of timing, not after
        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            sys.exit(f"error: cannot write --json {args.json}: its folder is missing or not writable, or it is a folder")
    try:
        result = bench(args.device, args.batch_size, args.images, args.repeats, args.quick, args.compile)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(table(result))
    if args.json:
        from .results import write_json
        try:
            write_json(args.json, result)
        except OSError as e:
            sys.exit(f"error: cannot write --json {args.json} ({e.strerror or type(e).__name__})")


if __name__ == "__main__":
    main()
