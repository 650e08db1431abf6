"""Where a run's files go, and writing them so that none is ever half-written: metrics.json, plots,
checkpoints, the model, and reading finished runs back (for 07's recipe and the report)."""
import dataclasses
import json
import os
import platform
import random
import subprocess
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import torch
import torchvision

from .config import RECIPE_FIELDS, UserError

# Fields that may change between an interrupted run and its --resume without changing the result.
RESUMABLE_CHANGES = {"resume", "data_dir", "results_dir"}


def run_dir(cfg):
    """<results-dir>[/quick]/<name>/seed-<seed>: smoke runs never overwrite real ones."""
    root = Path(cfg.results_dir) / "quick" if cfg.quick else Path(cfg.results_dir)
    return root / cfg.name / f"seed-{cfg.seed}"


def _atomic(path, write):
    """write(tmp_path) beside `path`, then rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text):
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1) + "\n")


def save_torch(path, obj):
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device, precision):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    if device.type == "cpu":
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return dict(device=device.type, device_name=name, precision=precision, threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                numpy=np.__version__, git_commit=git_commit())


# --- checkpoints -----------------------------------------------------------------------------------------

def rng_states():
    numpy_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
                numpy=torch.from_numpy(numpy_state[1].astype(np.int64)), numpy_pos=int(numpy_state[2]),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]), None))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"]))
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, cfg, model, optimizer, schedule, progress):
    save_torch(path, dict(config=dataclasses.asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                          schedule=schedule.state_dict(), progress=dict(vars(progress)), rng=rng_states()))


def load_checkpoint(path, cfg):
    """The checkpoint of an interrupted run of this very config, or a UserError saying why not."""
    if not path.exists():
        raise UserError(f"--resume: nothing to resume, no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: {path} is unreadable ({type(e).__name__}); delete it and start afresh") from None
    differs = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
               if k not in RESUMABLE_CHANGES and getattr(cfg, k, None) != v}
    if differs:
        listed = ", ".join(f"--{k.replace('_', '-')} {old!r} (now {new!r})" for k, (old, new) in differs.items())
        raise UserError(f"--resume: the checkpoint in {path.parent} was made with {listed}; pass the same flags")
    return ckpt


# --- plots -----------------------------------------------------------------------------------------------

def save_figure(fig, path):
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_curves(progress, name, out):
    steps_per_epoch = len(progress.steps) / max(1, len(progress.history))
    epochs_at = [h["epoch"] * steps_per_epoch for h in progress.history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(progress.steps) + 1), progress.steps, lw=0.6, alpha=0.7, label="train (per step)")
    ax.plot(epochs_at, [h["val_loss"] for h in progress.history], "o-", label="validation (per epoch)")
    ax.set(xlabel="step", ylabel="cross-entropy", title=f"{name}: loss")
    ax.legend()
    save_figure(fig, out / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in progress.history]
    ax.plot(epochs, [100 * h["train_acc"] for h in progress.history], "o-", label="train")
    ax.plot(epochs, [100 * h["val_acc"] for h in progress.history], "o-", label="validation")
    ax.axvline(progress.best_epoch, color="grey", ls=":", label=f"chosen epoch ({progress.best_epoch})")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{name}: accuracy")
    ax.legend()
    save_figure(fig, out / "accuracy.png")


def plot_confusion(matrix, title, path):
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true digit", title=title)
    save_figure(fig, path)


def plot_augmented(originals, versions, path):
    """A grid: each row an original training image, then augmented draws of it (what the model sees)."""
    columns = [originals] + list(versions)
    fig, axes = plt.subplots(len(originals), len(columns), figsize=(1.2 * len(columns), 1.2 * len(originals)))
    for i in range(len(originals)):
        for j, images in enumerate(columns):
            axes[i, j].imshow(images[i].float().permute(1, 2, 0).cpu().numpy())
            axes[i, j].axis("off")
    axes[0, 0].set_title("original", fontsize=8)
    for j in range(1, len(columns)):
        axes[0, j].set_title(f"draw {j}", fontsize=8)
    save_figure(fig, path)


# --- finished runs ---------------------------------------------------------------------------------------

def read_metrics(path):
    """A finished run's metrics.json, or None with the reason when it is unreadable or not ours."""
    try:
        metrics = json.loads(Path(path).read_text())
        if not (isinstance(metrics, dict) and "config" in metrics and "test" in metrics):
            return None, "not a metrics.json of this project"
        return metrics, None
    except (OSError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__})"


def best_recipe(cfg):
    """The recipe (RECIPE_FIELDS) of the finished 01-06 runs with the best mean validation accuracy,
    among runs of the same profile (quick runs only choose among quick runs)."""
    root = run_dir(cfg).parent.parent
    scores = {}
    for path in sorted(root.glob("0[1-6]_*/seed-*/metrics.json")):
        metrics, _ = read_metrics(path)
        if metrics and metrics.get("status") == "finished":
            scores.setdefault(path.parent.parent.name, []).append((metrics["best_val_acc"], metrics["config"]))
    if not scores:
        return {}, f"no finished 01-06 run in {root}: the script's own recipe"
    name, runs = max(scores.items(), key=lambda kv: np.mean([acc for acc, _ in kv[1]]))
    mean = np.mean([acc for acc, _ in runs])
    recipe = {k: runs[0][1][k] for k in RECIPE_FIELDS if k in runs[0][1]}
    return recipe, (f"{name}: best mean validation accuracy {100 * mean:.2f}% over {len(runs)} seed(s) "
                    f"among {len(scores)} finished 01-06 experiment(s) in {root}")
