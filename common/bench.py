"""python -m common.bench: the project's pipeline against the writeup-style one, side by side, one process.

Writeup style = torchvision transforms on PIL images, one image at a time inside a DataLoader, fp32,
NCHW, glibc's default allocator settings. Ours = uint8 data on the device, augmentation of whole batches
as tensor ops, bf16 autocast where native, channels_last, freed memory kept mapped (keep_freed_memory).
Every row: median of --repeats timings after a warm-up, both sides on the same images; ratio > 1 means
ours is better.
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from .config import Config, UserError
from .models import resnet18
from .train import autocast, batches, keep_freed_memory, pick_device, pick_precision, to_input

STACK = Config(rotate=15, shear=10, translate=0.1, crop_scale=0.25, perspective=0.15, jitter=0.3)  # 04's


def pil_transform(cfg):
    """The writeup's per-image augmentation stack at 04's strengths (torchvision v1 transforms, PIL)."""
    geometric = []
    if cfg.rotate or cfg.shear or cfg.translate:
        geometric.append(T.RandomAffine(cfg.rotate, translate=(cfg.translate,) * 2, shear=cfg.shear))
    if cfg.crop_scale:
        geometric.append(T.RandomResizedCrop(32, scale=(1 - cfg.crop_scale, 1), antialias=True))
    if cfg.perspective:
        geometric.append(T.RandomPerspective(2 * cfg.perspective, p=1.0))
    if cfg.jitter:
        geometric.append(T.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter))
    return T.Compose([T.ToPILImage(), *geometric, T.ToTensor()])


class PerImage(Dataset):
    """What a torchvision dataset does per item: uint8 image -> PIL -> transforms -> float tensor."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def timed(fn, repeats, sync):
    fn()  # warm-up: allocator, oneDNN/cuDNN kernel choice
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def augment_baseline(images, cfg):
    transform = pil_transform(cfg)
    return torch.stack([transform(img) for img in images.cpu()])


def as_input(images, channels_last):
    """Ours is the project's to_input; the writeup style is the same [0, 1] floats left NCHW."""
    return to_input(images) if channels_last else images.float() / 255


def train_steps(model, images, labels, batch_size, precision, channels_last):
    """One pass of SGD steps over the images; returns the mean loss (the same images on both sides)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    total = 0.0
    for xb, yb in batches(images, labels, batch_size):
        with autocast(images.device, precision):
            loss = F.cross_entropy(model(as_input(xb, channels_last)).float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hold_datasets(scale):
    """Run in a fresh process: the four datasets at their official sizes (1/scale of them) in the loaders'
    layout, uint8 N x 3 x 32 x 32 with MNIST's grey stored once and shown as RGB by expand(). Returns the bytes
    of our storage, of the writeup's float32 storage (as ToTensor() yields), and the process RSS holding ours."""
    sizes = [max(1, n // scale) for n in (73257, 26032, 60000, 10000)]  # SVHN train, test; MNIST train, test
    ours = [torch.ones(n, 3, 32, 32, dtype=torch.uint8) for n in sizes[:2]]
    ours += [torch.ones(n, 1, 32, 32, dtype=torch.uint8).expand(-1, 3, -1, -1) for n in sizes[2:]]
    ours_bytes = sum(t.untyped_storage().nbytes() for t in ours)
    return sum(4 * n * 3 * 32 * 32 for n in sizes), ours_bytes, rss_bytes()


def memory_row(scale):
    """(writeup MiB, ours MiB, RSS MiB) measured in a spawned process: this one holds the models and the
    DataLoader's leftovers, which would be charged to the datasets."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        baseline, ours, rss = pool.apply(hold_datasets, (scale,))
    return baseline / 2**20, ours / 2**20, rss / 2**20


def bench(device="auto", batch_size=128, images=1024, repeats=3, quick=False, compile=False):
    device = pick_device(device)
    precision = pick_precision("auto", device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if quick:
        images, repeats, batch_size = 64, 1, 32
    torch.manual_seed(0)
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (images,))
    on_device = data.to(device), labels.to(device)
    width = 16 if quick else 64
    n_aug, n_step, epoch_images = min(images, 512), min(images, 4 * batch_size), images - images % batch_size
    step_data = on_device[0][:n_step], on_device[1][:n_step]
    generator = torch.Generator(device=device).manual_seed(0)
    init = resnet18(width=width).state_dict()

    def fresh(channels_last):
        model = resnet18(width=width)
        model.load_state_dict(init)
        return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    fp32_model, base_model, our_model = fresh(False), fresh(False), fresh(True)

    # One epoch with augmentation: a DataLoader of per-image PIL transforms feeding an fp32 NCHW model,
    # against batches sliced on the device, augmented as tensors, bf16 + channels_last.
    loader = DataLoader(PerImage(data, labels, pil_transform(STACK)), batch_size=batch_size, shuffle=True,
                        num_workers=0 if quick else os.cpu_count(), drop_last=True)

    def epoch_baseline():
        optimizer = torch.optim.SGD(base_model.parameters(), lr=0.01, momentum=0.9)
        for xb, yb in loader:
            loss = F.cross_entropy(base_model(xb.to(device)), yb.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def epoch_ours():
        optimizer = torch.optim.SGD(our_model.parameters(), lr=0.01, momentum=0.9)
        for step, (xb, yb) in enumerate(batches(*on_device, batch_size, generator)):
            inputs = to_input(xb, STACK, step)
            with autocast(device, precision):
                loss = F.cross_entropy(our_model(inputs).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.inference_mode()
    def evaluate(model, precision_, channels_last):
        model.eval()
        for xb, _ in batches(*on_device, 512):
            with autocast(device, precision_):
                model(as_input(xb, channels_last))

    def fp32_steps():
        return train_steps(fp32_model, *step_data, batch_size, "fp32", False)

    # The writeup-style sides first, with glibc's default allocator settings, as a user's script runs ...
    base = dict(augment=timed(lambda: augment_baseline(data[:n_aug], STACK), repeats, sync),
                train_step=timed(fp32_steps, repeats, sync),
                epoch=timed(epoch_baseline, max(1, repeats - 1), sync),
                eval=timed(lambda: evaluate(fp32_model, "fp32", False), repeats, sync))
    # ... then ours, with what fit() sets up; this cannot be undone within the process.
    keep_freed_memory(device)
    # Augmented in training batches, as fit() does: per-call overheads count.
    ours = dict(augment=timed(lambda: [to_input(b, STACK, i) for i, b in enumerate(on_device[0][:n_aug].split(batch_size))],
                              repeats, sync),
                train_step=timed(lambda: train_steps(our_model, *step_data, batch_size, precision, True), repeats, sync),
                epoch=timed(epoch_ours, max(1, repeats - 1), sync),
                eval=timed(lambda: evaluate(our_model, precision, True), repeats, sync))
    fp32_kept = timed(fp32_steps, repeats, sync)

    rows = []

    def row(name, detail, baseline, ours, unit, higher_is_better=True):
        ratio = ours / baseline if higher_is_better else baseline / ours
        rows.append(dict(name=name, detail=detail, baseline=baseline, ours=ours, unit=unit, ratio=ratio))

    row("augment", f"04's stack: PIL per image vs batches of {batch_size}", n_aug / base["augment"], n_aug / ours["augment"], "images/s")
    row("train_step", f"fp32 NCHW vs {precision} channels_last + allocator", n_step / base["train_step"], n_step / ours["train_step"], "images/s")
    row("train_step_precision", f"both with the allocator setting: fp32 NCHW vs {precision} channels_last",
        n_step / fp32_kept, n_step / ours["train_step"], "images/s")
    if compile:
        compiled = torch.compile(fresh(True))
        t_comp = timed(lambda: train_steps(compiled, *step_data, batch_size, precision, True), repeats, sync)
        row("train_step_compiled", f"{precision}: not compiled vs torch.compile", n_step / ours["train_step"], n_step / t_comp, "images/s")
    row("epoch", f"augmented: DataLoader + PIL, fp32 vs uint8 on the device, {precision}", epoch_images / base["epoch"],
        epoch_images / ours["epoch"], "images/s")
    row("eval", f"fp32 NCHW vs {precision} channels_last + allocator", images / base["eval"], images / ours["eval"], "images/s")
    base_mb, ours_mb, total_mb = memory_row(scale=100 if quick else 1)
    row("memory", "4 datasets: float32 vs uint8", base_mb, ours_mb, "MiB", higher_is_better=False)
    return dict(device=str(device), device_name=_device_name(device), precision=precision, images=images,
                batch_size=batch_size, threads=torch.get_num_threads(), process_rss_mib=total_mb, rows=rows)


def _device_name(device):
    from .results import environment
    return environment(device, "")["device_name"]


def table(result):
    lines = [f"device: {result['device_name']} ({result['device']}, {result['threads']} threads, {result['precision']}); "
             f"{result['images']} images, batch {result['batch_size']}",
             f"{'':20} {'writeup style':>14} {'ours':>12} {'unit':>9} {'ratio':>7}   sides"]
    for r in result["rows"]:
        lines.append(f"{r['name']:20} {r['baseline']:14.1f} {r['ours']:12.1f} {r['unit']:>9} {r['ratio']:6.1f}x   "
                     f"{r['detail']}")
    lines.append(f"RSS of a fresh process (torch and the project imported) holding our four datasets: "
                 f"{result['process_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:
        result = bench(args.device, args.batch_size, args.images, args.repeats, args.quick, args.compile)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(table(result))
    if args.json:
        from .results import write_json
        write_json(args.json, result)


if __name__ == "__main__":
    main()
