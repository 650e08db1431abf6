"""run(cfg): what every numbered script calls. Data, model, fit(), test, and results written in place."""
import dataclasses
import random
import shutil
import sys
import textwrap
import time
from datetime import datetime, timezone

import numpy as np
import torch

from . import data
from .config import UserError
from .augment import augment
from .models import build_model, imagenet_weights_file
from .results import (environment, load_checkpoint, plot_augmented, plot_confusion, plot_curves, run_dir,
                      save_checkpoint, save_figure, save_torch, set_rng_states, write_json)
from .train import (Diverged, Progress, epoch_generator, evaluate, fit, make_optimizer, make_schedule, pick_device,
                    pick_precision, steps_per_epoch)

QUICK_IMAGES = 256
# What a model.pt fixes about the network: a run initialized from it (08) takes these from it.
MODEL_FIELDS = ("arch", "norm", "input_norm", "width", "transfer_input")


def run(cfg):
    """Entry point of the numbered scripts: a user error is one line and exit 1, divergence exit 3,
    Ctrl-C exit 130 (after saving what can be resumed)."""
    try:
        label_efficiency(cfg) if cfg.sweep else train_experiment(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")


def resolve(cfg):
    """Apply the --quick smoke profile: a few hundred images, one epoch, results under quick/."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, epochs=1, train_subset=min(cfg.train_subset or QUICK_IMAGES, QUICK_IMAGES),
                               eval_subset=min(cfg.eval_subset or QUICK_IMAGES, QUICK_IMAGES))


def load_data(cfg, device):
    """(train, val, {"svhn": test, "mnist": test}) as (uint8 images, labels) pairs on the device."""
    x, y = data.load(cfg.dataset, "train", cfg.data_dir)
    train_idx, val_idx = data.split_train_val(len(y), cfg.val_fraction)
    if cfg.train_subset:
        train_idx = train_idx[data.stratified_subset(y[train_idx], cfg.train_subset, what="--train-subset")]
    if cfg.eval_subset:
        val_idx = val_idx[data.stratified_subset(y[val_idx], min(cfg.eval_subset, len(val_idx)))]
    train = x[train_idx].to(device), y[train_idx].to(device)
    val = x[val_idx].to(device), y[val_idx].to(device)
    tests = {}
    for name in ("svhn", "mnist"):
        tx, ty = data.load(name, "test", cfg.data_dir)
        keep = data.stratified_subset(ty, min(cfg.eval_subset, len(ty))) if cfg.eval_subset else slice(None)
        tests[name] = tx[keep].to(device), ty[keep].to(device)
    return train, val, tests


def input_stats(images):
    """Per-channel mean and std of the training images (a 10k sample is exact to 3 decimals)."""
    sample = images[:10_000].float() / 255
    return sample.mean((0, 2, 3)).tolist(), sample.std((0, 2, 3)).clamp(min=1e-3).tolist()


def source_model(cfg):
    """The model.pt of cfg.init_from for the same seed and profile, with the config it was trained with."""
    path = run_dir(dataclasses.replace(cfg, name=cfg.init_from)) / "model.pt"
    if not path.exists():
        raise UserError(f"no trained model at {path}: run `python {cfg.init_from}.py"
                        f"{' --quick' if cfg.quick else ''} --seed {cfg.seed}` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); rerun {cfg.init_from}.py") from None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_config(cfg):
    text = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v != "")
    print(textwrap.fill(text, width=110, initial_indent="config: ", subsequent_indent="        "), flush=True)


def train_experiment(cfg):
    """Train, pick the epoch on validation, test on SVHN and MNIST, write results; returns metrics."""
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    cfg = resolve(cfg)
    out = run_dir(cfg)
    partial = out / "partial"  # the run in progress; finished files land in `out` only at the end
    try:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / ".write-test").touch()
    except OSError as e:
        raise UserError(f"cannot write results to {partial} ({e.strerror}); pass a writable --results-dir") from None
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.amp, device)
    source = None
    if cfg.init_from:
        source, source_path = source_model(cfg)
        cfg = dataclasses.replace(cfg, **{k: source["config"][k] for k in MODEL_FIELDS})
    ckpt = load_checkpoint(partial / "checkpoint.pt", cfg) if cfg.resume else None
    if cfg.arch == "imagenet_resnet18" and not (source or ckpt):
        imagenet_weights_file(cfg.weights)  # fail before the data is loaded, not after
    print_config(cfg)

    seed_everything(cfg.seed)
    train, val, tests = load_data(cfg, device)
    model = build_model(cfg, *input_stats(train[0]), pretrained=source is None and ckpt is None)
    if source:
        model.load_state_dict(source["model"])
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer, steps_per_epoch(len(train[1]), cfg.batch_size))
    progress = Progress()
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        progress = Progress(**ckpt["progress"])
        set_rng_states(ckpt["rng"])
        print(f"resuming after epoch {progress.epoch} from {partial / 'checkpoint.pt'}")
    else:
        (partial / "checkpoint.pt").unlink(missing_ok=True)

    metrics = dict(status="running", name=cfg.name, config=dataclasses.asdict(cfg), command=" ".join(sys.argv),
                   started=started, **environment(device, precision),
                   data=dict(train=len(train[1]), val=len(val[1]), **{f"test_{k}": len(v[1]) for k, v in tests.items()}),
                   init_from=str(source_path) if source else None)
    elapsed_before = ckpt["progress"].get("elapsed", 0.0) if ckpt else 0.0

    def snapshot(status):
        return dict(metrics, status=status, history=progress.history, steps=progress.steps,
                    best_epoch=progress.best_epoch, best_val_acc=progress.best_val_acc,
                    wall_time_s=elapsed_before + time.perf_counter() - t0)

    def on_epoch_end(progress):
        progress.elapsed = elapsed_before + time.perf_counter() - t0
        save_checkpoint(partial / "checkpoint.pt", cfg, model, optimizer, schedule, progress)
        write_json(partial / "metrics.json", snapshot("running"))

    write_json(partial / "metrics.json", snapshot("running"))
    try:
        fit(model, optimizer, schedule, cfg, train, val, precision, progress, on_epoch_end)
    except KeyboardInterrupt:
        write_json(partial / "metrics.json", snapshot("interrupted"))
        done = f"{progress.epoch} epoch(s) are saved; resume with" if progress.epoch else "no epoch finished; rerun"
        print(f"\ninterrupted: {done}: python {sys.argv[0]} {' '.join(sys.argv[1:])}"
              f"{'' if cfg.resume or not progress.epoch else ' --resume'}", file=sys.stderr)
        sys.exit(130)
    except Diverged as e:
        write_json(partial / "metrics.json", dict(snapshot("diverged"), error=str(e)))
        print(f"error: {e}. The last good checkpoint is {partial / 'checkpoint.pt'}", file=sys.stderr)
        sys.exit(3)
    except BaseException as e:
        write_json(partial / "metrics.json", dict(snapshot("failed"), error=f"{type(e).__name__}: {e}"))
        raise

    model.load_state_dict(progress.best_weights)
    test, confusion = {}, {}
    for name, (x, y) in tests.items():
        _, test[name], preds = evaluate(model, x, y, precision)
        confusion[name] = torch.bincount(y * 10 + preds, minlength=100).view(10, 10).tolist()
    cross = "mnist" if cfg.dataset == "svhn" else "svhn"
    plot_confusion(confusion[cross], f"{cfg.name}: {cross.upper()} test ({100 * test[cross]:.1f}%)",
                   out / f"confusion_{cross}.png")
    plot_curves(progress, cfg.name, out)
    if cfg.augments:
        originals = train[0][:8]
        generator = epoch_generator(cfg.seed, -1, device)
        plot_augmented(originals / 255, [augment(originals, cfg, generator) for _ in range(4)], out / "augmented.png")
    save_torch(out / "model.pt", dict(config=dataclasses.asdict(cfg), model=progress.best_weights))
    metrics = dict(snapshot("finished"), test=test, confusion=confusion,
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json(out / "metrics.json", metrics)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"test (epoch {progress.best_epoch}, chosen on validation): SVHN {100 * test['svhn']:.2f}% | "
          f"MNIST {100 * test['mnist']:.2f}% | {metrics['wall_time_s']:.0f}s on {metrics['device_name']} ({precision})")
    print(f"wrote {out}/: metrics.json loss.png accuracy.png confusion_{cross}.png model.pt"
          + (" augmented.png" if cfg.augments else ""))
    return metrics


def label_efficiency(cfg):
    """08 --sweep: SVHN test accuracy against the number of labelled SVHN images, fine-tuned from
    cfg.init_from versus trained from scratch with the same budget."""
    import matplotlib.pyplot as plt

    cfg = resolve(cfg)
    n_train = len(data.split_train_val(len(data.load(cfg.dataset, "train", cfg.data_dir)[1]), cfg.val_fraction)[0])
    sizes = [n for n in cfg.sizes if n <= n_train]
    if len(sizes) < len(cfg.sizes):
        print(f"sweep: skipping sizes above the {n_train} training images: {[n for n in cfg.sizes if n > n_train]}")
    if not sizes:
        raise UserError(f"--sweep-sizes: every size exceeds the {n_train} training images")
    rows = []
    for n in sizes:
        for start in ("fine-tuned", "scratch"):
            sub = dataclasses.replace(cfg, name=f"{cfg.name}/sweep/{start}-{n}", sweep=False, quick=False,
                                      train_subset=n, init_from=cfg.init_from if start == "fine-tuned" else "")
            if cfg.quick:  # keep the smoke profile's folder and caps without re-capping the sizes
                sub = dataclasses.replace(sub, results_dir=f"{cfg.results_dir}/quick")
            m = train_experiment(sub)
            rows.append(dict(labels=n, start=start, svhn=m["test"]["svhn"], mnist=m["test"]["mnist"]))
    out = run_dir(cfg)
    write_json(out / "sweep.json", dict(config=dataclasses.asdict(cfg), rows=rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for start in ("fine-tuned", "scratch"):
        points = [(r["labels"], 100 * r["svhn"]) for r in rows if r["start"] == start]
        ax.plot(*zip(*points), "o-", label=f"{start}" + (f" from {cfg.init_from}" if start == "fine-tuned" else ""))
    ax.set(xscale="log", xlabel="labelled SVHN training images", ylabel="SVHN test accuracy (%)",
           title="label efficiency")
    ax.legend()
    save_figure(fig, out / "label_efficiency.png")
    print(f"wrote {out}/: sweep.json label_efficiency.png")
    return rows
