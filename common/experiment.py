"""run(cfg): what every numbered script calls. Data, model, fit(), test, and results written in place."""
import contextlib
import dataclasses
import random
import shutil
import signal
import sys
import textwrap
import time
from datetime import datetime, timezone

import numpy as np
import torch

from . import data, distributed
from .config import UserError
from .augment import augment
from .models import build_model, imagenet_weights_file
from .results import (environment, load_checkpoint, plot_augmented, plot_confusion, plot_curves, read_torch,
                      restore_checkpoint, run_dir, run_lock, save_checkpoint, save_figure, save_torch, saved_epochs,
                      staging_dir, swap_in, write_json)
from .train import (Diverged, Progress, configure_backends, evaluate, fit, grad_scaler, make_optimizer, make_schedule,
                    pick_device, pick_precision, steps_per_epoch)
from .tta import adapted_accuracy

QUICK_IMAGES = 256
# What a model.pt fixes about the network: a run initialized from it (08) takes these from it.
MODEL_FIELDS = ("arch", "norm", "input_norm", "width", "transfer_input")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, Slurm's time limit) handled as Ctrl-C: progress saved, exit 143."""
    exit_code = 143


def _on_sigterm(signum, frame):
    raise Terminated()


def run(cfg):
    """Entry point of the numbered scripts: a user error or a file-system fault is one line and exit 1,
    divergence exit 3, Ctrl-C exit 130 and SIGTERM 143 (after saving what can be resumed)."""
    if distributed.is_main():  # other ranks write nothing: SIGTERM's default, immediate exit, suits them
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        label_efficiency(cfg) if cfg.sweep else train_experiment(cfg)
    except UserError as e:  # under torchrun every rank meets it (same inputs, or on_main): rank 0 says it
        sys.exit(f"error: {e}" if distributed.is_main() else 1)
    except OSError as e:  # disk full, permissions, a folder where a file should be: nothing to debug in our code
        where = f": {e.filename}" if e.filename else ""
        sys.exit(f"error: {e.strerror or type(e).__name__}{where}")
    finally:
        distributed.shutdown()


def resolve(cfg):
    """Apply the --quick smoke profile: a few hundred images, one epoch, results under quick/."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, epochs=1, train_subset=min(cfg.train_subset or QUICK_IMAGES, QUICK_IMAGES),
                               eval_subset=min(cfg.eval_subset or QUICK_IMAGES, QUICK_IMAGES))


def labelled_split(labels, cfg):
    """(train, val) indices into the training file. --train-subset N is the whole label budget: N images
    drawn with the run's seed (so seeds resample which images are labelled), validation carved out of them.
    Without it, validation is a fixed 5% of the file, the same for every run and seed."""
    labelled = torch.arange(len(labels))
    if cfg.train_subset:
        labelled = data.stratified_subset(labels, cfg.train_subset, seed=cfg.seed, what="--train-subset")
    train_pos, val_pos = data.split_train_val(len(labelled), cfg.val_fraction)
    if len(train_pos) == 0:
        raise UserError(f"--train-subset {len(labelled)} leaves no training image after the validation split")
    return labelled[train_pos], labelled[val_pos]


def load_data(cfg, device):
    """(train, val, {"svhn": test, "mnist": test}) as (uint8 images, labels) pairs on the device."""
    x, y = data.load(cfg.dataset, "train", cfg.data_dir)
    train_idx, val_idx = labelled_split(y, cfg)
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


DEV_IMAGES = 10_000  # a 0.01-point resolution, and seconds to evaluate


def load_dev(cfg, device):
    """The cross-domain dataset's training file, which this run never trains on: a labelled target dev set for
    choosing cross-domain recipes (for 07, the real SVHN train crops), so that the test sets choose nothing.
    Stratified, at most DEV_IMAGES (or --eval-subset)."""
    cross = "mnist" if cfg.dataset == "svhn" else "svhn"
    x, y = data.load(cross, "train", cfg.data_dir)
    cap = min(cfg.eval_subset or DEV_IMAGES, DEV_IMAGES, len(y))
    keep = data.stratified_subset(y, cap) if cap < len(y) else slice(None)
    return cross, (x[keep].to(device), y[keep].to(device))


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
    source = read_torch(path, f"rerun {cfg.init_from}.py")
    if not (isinstance(source.get("model"), dict) and all(k in source.get("config", {}) for k in MODEL_FIELDS)):
        raise UserError(f"{path} lacks the model or its config (fields {', '.join(MODEL_FIELDS)}); rerun {cfg.init_from}.py")
    return source, path


def from_source(cfg, source, path):
    """cfg with the network fields of the model it starts from; a conflicting flag is refused, not ignored."""
    built = source["config"]
    passed = set(cfg.overrides.split(",")) if cfg.overrides else set()
    conflicts = [f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (the model has {built[k]!r})"
                 for k in MODEL_FIELDS if k in passed and getattr(cfg, k) != built[k]]
    if conflicts:
        raise UserError(f"{cfg.name} fine-tunes {path}, whose network is fixed: drop {', '.join(conflicts)}, "
                        f"or retrain {cfg.init_from} with them")
    return dataclasses.replace(cfg, **{k: built[k] for k in MODEL_FIELDS})


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_config(cfg):
    text = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v != "")
    print(textwrap.fill(text, width=110, initial_indent="config: ", subsequent_indent="        "), flush=True)


def staging_for(out, cfg):
    """Prepare out's staging folder (where the run writes everything until it swaps in whole): the checkpoint
    to resume from, or None. Saved epochs are never discarded unless --restart says so. Under torchrun rank 0
    prepares the folder and every rank reads the checkpoint."""
    staging = staging_dir(out)

    def prepare():
        if cfg.resume:
            return
        saved = saved_epochs(staging / "checkpoint.pt")
        if saved and not cfg.restart:
            raise UserError(f"{staging} holds an interrupted run with {saved} epoch(s) saved: pass --resume to "
                            "continue it, or --restart to discard it")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.on_main(prepare)
    return staging, load_checkpoint(staging / "checkpoint.pt", cfg) if cfg.resume else None


def train_experiment(cfg, source=None):
    """Train, pick the epoch on validation, test on SVHN and MNIST, write results; returns metrics.
    `source`: (state, path) of the model to start from, when the caller has it already (08's sweep)."""
    cfg = resolve(cfg)
    out = run_dir(cfg)
    device = distributed.setup(pick_device(cfg.device))
    with contextlib.ExitStack() as held:
        distributed.on_main(lambda: held.enter_context(run_lock(out)))  # rank 0 alone writes
        return _train(cfg, out, device, source)


def _train(cfg, out, device, source):
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    precision = pick_precision(cfg.amp, device)
    backends = configure_backends(device, cfg.deterministic)
    if cfg.init_from:
        source = source or source_model(cfg)
        cfg = from_source(cfg, *source)
    staging, ckpt = staging_for(out, cfg)
    if cfg.arch == "imagenet_resnet18" and cfg.pretrained and not (source or ckpt):
        imagenet_weights_file(cfg.weights)  # fail before the data is loaded, not after
    main = distributed.is_main()
    if main:
        print_config(cfg)

    seed_everything(cfg.seed)
    train, val, tests = load_data(cfg, device)
    dev = load_dev(cfg, device)  # loaded now: a missing file fails the run before training, not after
    model = build_model(cfg, *input_stats(train[0]), pretrained=cfg.pretrained and source is None and ckpt is None)
    if source:
        try:
            model.load_state_dict(source[0]["model"])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise UserError(f"{source[1]} does not fit the network its config describes ({str(e).splitlines()[0][:160]}); "
                            f"rerun {cfg.init_from}.py") from None
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer, steps_per_epoch(len(train[1]), cfg.batch_size))
    scaler = grad_scaler(device, precision)
    progress = Progress()
    if ckpt:
        restore_checkpoint(ckpt, staging / "checkpoint.pt", model, optimizer, schedule, scaler)
        try:
            progress = Progress(**ckpt["progress"])
        except TypeError:
            raise UserError(f"--resume: {staging / 'checkpoint.pt'} has no readable progress; start afresh with --restart") from None
        if main:
            print(f"resuming after epoch {progress.epoch} from {staging / 'checkpoint.pt'}")

    metrics = dict(status="running", name=cfg.name, config=dataclasses.asdict(cfg), command=" ".join(sys.argv),
                   started=started, **environment(device, precision), grad_scaler=scaler.is_enabled(), **backends,
                   labels_used=len(train[1]) + len(val[1]), world_size=distributed.world_size(),
                   backend=distributed.backend(),
                   batchnorm_stats="synchronized" if distributed.synchronized_bn(device, cfg) else "per process",
                   data=dict(train=len(train[1]), val=len(val[1]), **{f"dev_{dev[0]}": len(dev[1][1])},
                             **{f"test_{k}": len(v[1]) for k, v in tests.items()}),
                   init_from=str(source[1]) if source else None)
    elapsed_before = ckpt["progress"].get("elapsed", 0.0) if ckpt else 0.0

    def snapshot(status):
        return dict(metrics, status=status, history=progress.history, steps=progress.steps,
                    best_epoch=progress.best_epoch, best_val_acc=progress.best_val_acc,
                    wall_time_s=elapsed_before + time.perf_counter() - t0)

    def on_epoch_end(progress):
        progress.elapsed = elapsed_before + time.perf_counter() - t0
        if not main:
            return
        save_checkpoint(staging / "checkpoint.pt", cfg, model, optimizer, schedule, scaler, progress)
        write_json(staging / "metrics.json", snapshot("running"))

    def record_failure(status, **extra):
        if not main:
            return
        try:  # on a full disk this write fails too: the original error is the one to report
            write_json(staging / "metrics.json", dict(snapshot(status), **extra))
        except OSError:
            pass

    if main:
        write_json(staging / "metrics.json", snapshot("running"))
    try:
        fit(model, optimizer, schedule, cfg, train, val, precision, progress, on_epoch_end, scaler)
        if not main:
            return None
        metrics = finish(cfg, model, progress, tests, dev, train, precision, staging, snapshot)
    except KeyboardInterrupt as e:
        if not main:  # rank 0 says it; torchrun stops the others
            sys.exit(getattr(e, "exit_code", 130))
        record_failure("interrupted")
        saved = saved_epochs(staging / "checkpoint.pt")
        done = f"{saved} epoch(s) are saved; resume with" if saved else "no epoch finished; rerun"
        resume = " --resume" if saved and not cfg.resume else ""
        print(f"\ninterrupted: {done}: python {sys.argv[0]} {' '.join(a for a in sys.argv[1:] if a != '--restart')}"
              f"{resume}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))
    except Diverged as e:
        if not main:
            sys.exit(3)
        record_failure("diverged", error=str(e))
        saved = saved_epochs(staging / "checkpoint.pt")
        last = f"The last good checkpoint ({saved} epoch(s)) is {staging / 'checkpoint.pt'}" if saved else \
            "No epoch finished before it"
        print(f"error: {e}. {last}; this run's results were not written", file=sys.stderr)
        sys.exit(3)
    except BaseException as e:
        record_failure("failed", error=f"{type(e).__name__}: {e}")
        raise
    swap_in(staging, out)
    adapted = "".join(f" | {target.upper()} after --tta {method} {100 * v:.2f}%"
                      for method, accuracy in metrics["test_tta"].items() for target, v in accuracy.items())
    print(f"dev ({', '.join(f'{k.upper()} train file {100 * v:.2f}%' for k, v in metrics['dev'].items())}) | "
          f"test (epoch {progress.best_epoch}, chosen on validation): SVHN {100 * metrics['test']['svhn']:.2f}% | "
          f"MNIST {100 * metrics['test']['mnist']:.2f}%{adapted} | {metrics['wall_time_s']:.0f}s on "
          f"{metrics['device_name']} ({precision})")
    print(f"wrote {out}/: {' '.join(sorted(p.name for p in out.iterdir()))}")
    return metrics


def finish(cfg, model, progress, tests, dev, train, precision, staging, snapshot):
    """Test the chosen epoch and write the finished set into staging: plots and model first, metrics.json
    (status finished) last, so a staging folder with a finished metrics.json is complete."""
    model.load_state_dict(progress.best_weights)
    dev_set, (dev_x, dev_y) = dev
    dev_acc = {dev_set: evaluate(model, dev_x, dev_y, precision)[1]}
    test, confusion = {}, {}
    for name, (x, y) in tests.items():
        _, test[name], preds = evaluate(model, x, y, precision)
        confusion[name] = torch.bincount(y * 10 + preds, minlength=100).view(10, 10).tolist()
    cross = "mnist" if cfg.dataset == "svhn" else "svhn"
    test_tta = {}
    for method in cfg.tta.split(","):  # beside the source-only number, never instead of it
        if method != "none":
            test_tta[method] = {cross: adapted_accuracy(model, *tests[cross], method, precision)}
    plot_confusion(confusion[cross], f"{cfg.name}: {cross.upper()} test ({100 * test[cross]:.1f}%)",
                   staging / f"confusion_{cross}.png")
    plot_curves(progress, cfg.name, staging)
    if cfg.augments:
        originals = train[0][:8]
        plot_augmented(originals / 255, [augment(originals, cfg, key) for key in range(4)], staging / "augmented.png")
    save_torch(staging / "model.pt", dict(config=dataclasses.asdict(cfg), model=progress.best_weights))
    metrics = dict(snapshot("finished"), dev=dev_acc, test=test, confusion=confusion, test_tta=test_tta,
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json(staging / "metrics.json", metrics)
    (staging / "checkpoint.pt").unlink(missing_ok=True)
    return metrics


def label_efficiency(cfg):
    """08 --sweep: SVHN test accuracy against the number of labelled SVHN images, fine-tuned from
    cfg.init_from versus trained from scratch with the same budget. Both arms build the same network
    (cfg.init_from's), so only the initialization (and the lr it suits) differs."""
    import matplotlib.pyplot as plt

    cfg = resolve(cfg)
    source = source_model(cfg)
    cfg = from_source(cfg, *source)
    n_labelled = len(data.load(cfg.dataset, "train", cfg.data_dir)[1])
    sizes = [n for n in cfg.sizes if n <= n_labelled]
    if len(sizes) < len(cfg.sizes):
        print(f"sweep: skipping sizes above the {n_labelled} labelled images: {[n for n in cfg.sizes if n > n_labelled]}")
    if not sizes:
        raise UserError(f"--sweep-sizes: every size exceeds the {n_labelled} labelled images")
    out = run_dir(cfg)
    rows = []
    for n in sizes:
        for start in ("fine-tuned", "scratch"):
            fine_tuned = start == "fine-tuned"
            sub = dataclasses.replace(cfg, name=f"{start}-{n}", sweep=False, quick=False, train_subset=n,
                                      results_dir=str(out.parent / "sweep"), init_from=cfg.init_from if fine_tuned else "",
                                      lr=cfg.lr if fine_tuned else cfg.scratch_lr, overrides="")
            m = train_experiment(sub, source if fine_tuned else None)
            if m is None:  # not rank 0: rank 0 collects
                continue
            rows.append(dict(labels=n, labels_used=m["labels_used"], start=start, lr=sub.lr,
                             svhn=m["test"]["svhn"], mnist=m["test"]["mnist"]))
    if not distributed.is_main():
        return rows
    write_json(out / "sweep.json", dict(config=dataclasses.asdict(cfg), rows=rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for start in ("fine-tuned", "scratch"):
        points = [(r["labels"], 100 * r["svhn"]) for r in rows if r["start"] == start]
        ax.plot(*zip(*points), "o-", label=f"{start}" + (f" from {cfg.init_from}" if start == "fine-tuned" else ""))
    ax.set(xscale="log", xlabel="labelled SVHN images (train + validation)", ylabel="SVHN test accuracy (%)",
           title="label efficiency")
    ax.legend()
    save_figure(fig, out / "label_efficiency.png")
    print(f"wrote {out}/: sweep.json label_efficiency.png")
    return rows
