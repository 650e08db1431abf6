"""Where a run's files go and what they hold: provenance, checkpoints, plots, and reading finished runs back
(for the report and 07's opt-in recipe inheritance). Files are written through plumbing's atomic writers."""
import dataclasses
import json
import platform
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure  # the Figure API draws without pyplot: no backend chosen, none changed

from .errors import UserError
from .plumbing import atomic, read_torch, save_torch, write_json, write_text

# Fields that may change between an interrupted run and its --resume without changing the result.
RESUMABLE_CHANGES = {"resume", "restart", "data_dir", "results_dir", "overrides", "tta"}


def run_dir(cfg):
    """<results-dir>[/quick]/<name>/seed-<seed>: smoke runs never overwrite real ones. A seed folder that is a
    symlink (results kept on another disk) stands for its target: the run is staged and swapped in there, and
    the link is kept."""
    root = Path(cfg.results_dir) / "quick" if cfg.quick else Path(cfg.results_dir)
    out = root / cfg.name / f"seed-{cfg.seed}"
    return out.resolve() if out.is_symlink() else out


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


HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def write_history(path, history):
    """history.csv beside metrics.json: one row per epoch, for spreadsheets and pandas."""
    rows = [",".join(HISTORY_COLUMNS)] + [",".join(repr(h.get(k, "")) for k in HISTORY_COLUMNS) for h in history]
    write_text(path, "\n".join(rows) + "\n")


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


CHECKPOINT_KEYS = ("config", "model", "optimizer", "schedule", "scaler", "progress", "rng")


def save_checkpoint(path, cfg, model, optimizer, schedule, scaler, progress, context):
    """`context`: what a resumed run must match beyond the config (world size, a fingerprint of the data)."""
    save_torch(path, dict(config=dataclasses.asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                          schedule=schedule.state_dict(), scaler=scaler.state_dict(), progress=dict(vars(progress)),
                          rng=rng_states(), context=context))


def restore_checkpoint(ckpt, path, model, optimizer, schedule, scaler):
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--resume: {path} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "start afresh with --restart") from None


def saved_epochs(path):
    """How many epochs a checkpoint holds (0 when there is none or it is unreadable: nothing to lose)."""
    if not path.exists():
        return 0
    try:
        return read_torch(path, "")["progress"]["epoch"]
    except (UserError, KeyError, TypeError):
        return 0


def load_checkpoint(path, cfg):
    """The checkpoint of an interrupted run of this very config, or a UserError saying why not."""
    if not path.exists():
        raise UserError(f"--resume: nothing to resume, no checkpoint at {path}")
    remedy = "start afresh with --restart"
    ckpt = read_torch(path, remedy)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise UserError(f"--resume: {path} lacks {', '.join(missing) or 'a config'}; {remedy}")
    differs = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
               if k not in RESUMABLE_CHANGES and getattr(cfg, k, None) != v}
    if differs:
        listed = ", ".join(f"--{k.replace('_', '-')} {old!r} (now {new!r})" for k, (old, new) in differs.items())
        raise UserError(f"--resume: the checkpoint in {path.parent} was made with {listed}; pass the same flags")
    return ckpt


# --- plots -----------------------------------------------------------------------------------------------

def figure(width, height):
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save_figure(fig, path):
    atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_curves(progress, name, out):
    steps_per_epoch = len(progress.steps) / max(1, len(progress.history))
    epochs_at = [h["epoch"] * steps_per_epoch for h in progress.history]
    fig, ax = figure(7, 4)
    ax.plot(range(1, len(progress.steps) + 1), progress.steps, lw=0.6, alpha=0.7, label="train (per step)")
    ax.plot(epochs_at, [h["val_loss"] for h in progress.history], "o-", label="validation (per epoch)")
    ax.set(xlabel="step", ylabel="cross-entropy", title=f"{name}: loss")
    ax.legend()
    save_figure(fig, out / "loss.png")

    fig, ax = figure(7, 4)
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
    fig, ax = figure(5.5, 5)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true digit", title=title)
    save_figure(fig, path)


def plot_augmented(originals, versions, path):
    """A grid: each row an original training image, then augmented draws of it (what the model sees)."""
    columns = [originals] + list(versions)
    fig = Figure(figsize=(1.2 * len(columns), 1.2 * len(originals)))
    axes = fig.subplots(len(originals), len(columns), squeeze=False)
    for i in range(len(originals)):
        for j, images in enumerate(columns):
            axes[i, j].imshow(images[i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())  # amplitude may overshoot
            axes[i, j].axis("off")
    axes[0, 0].set_title("original", fontsize=8)
    for j in range(1, len(columns)):
        axes[0, j].set_title(f"draw {j}", fontsize=8)
    save_figure(fig, path)


def write_sweep(cfg, rows, out):
    """08 --sweep: sweep.json and label_efficiency.png (SVHN test accuracy against labelled images, per arm) in
    their own folder, beside the sweep's runs. Nothing to write without rows (ranks other than 0)."""
    if not rows:
        return
    write_json(out / "sweep.json", dict(config=dataclasses.asdict(cfg), rows=rows))
    fig, ax = figure(6, 4)
    for start in ("fine-tuned", "scratch"):
        points = [(r["labels"], 100 * r["test"][cfg.dataset]) for r in rows if r["start"] == start]
        ax.plot(*zip(*points), "o-", label=start + (f" from {cfg.init_from}" if start == "fine-tuned" else ""))
    ax.set(xscale="log", xlabel="labelled images (train + validation)", ylabel=f"{cfg.dataset.upper()} test accuracy (%)",
           title="label efficiency")
    ax.legend()
    save_figure(fig, out / "label_efficiency.png")
    print(f"wrote {out}/: sweep.json label_efficiency.png")


# --- finished runs ---------------------------------------------------------------------------------------

FINISHED_KEYS = dict(config=dict, test=dict, data=dict, best_val_acc=float, wall_time_s=float, device_name=str,
                     precision=str)


def finished_files(root, experiments):
    """root/<experiment>/seed-<K>/metrics.json: finished sets only (not .partial staging nor .old)."""
    return [p for p in sorted(Path(root).glob(f"{experiments}/seed-*/metrics.json"))
            if re.fullmatch(r"seed-\d+", p.parent.name)]


def read_metrics(path):
    """A metrics.json, or None with the reason when it is unreadable or not ours. Finished runs are checked
    for every key the report and 07's recipe choice read."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested past the parser's limit
        return None, f"unreadable ({type(e).__name__})"
    if not (isinstance(metrics, dict) and isinstance(metrics.get("config"), dict)):
        return None, "not a metrics.json of this project"
    if metrics.get("status") == "finished":
        bad = [k for k, kind in FINISHED_KEYS.items()
               if not isinstance(metrics.get(k), (int, float) if kind is float else kind)]
        bad += [f"test.{k}" for k in ("svhn", "mnist") if not isinstance(metrics.get("test", {}).get(k), (int, float))]
        if bad:
            return None, f"finished, but lacks or garbles {', '.join(bad)}"
        path = Path(path)
        where = (metrics["config"].get("name"), f"seed-{metrics['config'].get('seed')}")
        if where != (path.parent.parent.name, path.parent.name):
            return None, f"its config says {'/'.join(map(str, where))}: moved or renamed, not counted here"
    return metrics, None


# What 07 --inherit-best copies from the best earlier run: how the network is built and trained. Not the data, and
# not the cross-domain choices (input_norm, invert, randconv, prorandconv), which 01-06 on SVHN cannot rank.
RECIPE_FIELDS = ("arch", "norm", "width", "transfer_input", "weights", "optimizer", "lr", "momentum",
                 "weight_decay", "warmup", "label_smoothing", "batch_size", "rotate", "shear", "translate",
                 "crop_scale", "perspective", "jitter")
PROFILE_FIELDS = ("dataset", "train_subset", "eval_subset", "val_fraction", "epochs")


def runs_by_profile(root, experiments="0[1-6]_*"):
    """{profile: {experiment: {seed: metrics}}} of the finished runs under root, and the files skipped."""
    runs, skipped = {}, []
    for path in finished_files(root, experiments):
        metrics, problem = read_metrics(path)
        if metrics is None or any(k not in metrics["config"] for k in PROFILE_FIELDS + ("seed",)):
            skipped.append(path)
        elif metrics.get("status") == "finished":
            config = metrics["config"]
            profile = tuple(config[k] for k in PROFILE_FIELDS)
            runs.setdefault(profile, {}).setdefault(path.parent.parent.name, {})[config["seed"]] = metrics
    return runs, skipped


def best_recipe(cfg):
    """The recipe (RECIPE_FIELDS) of the finished 01-06 experiment with the best mean validation accuracy,
    ranked only among comparable runs: one profile (PROFILE_FIELDS: same data, budget and validation) and the
    seeds every competitor finished. Runs of several profiles are refused, not mixed. Quick runs only choose
    among quick runs. Returns (recipe, why)."""
    root = run_dir(cfg).parent.parent
    runs, skipped = runs_by_profile(root)
    if skipped:
        print(f"--inherit-best: skipping unreadable or incomplete runs: {', '.join(map(str, skipped))}")
    if not runs:
        return {}, f"no finished 01-06 run in {root}: the script's own recipe"
    if len(runs) > 1:
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in zip(PROFILE_FIELDS, p)) + f" ({', '.join(sorted(e))})"
                          for p, e in runs.items())
        raise UserError(f"--inherit-best: the finished 01-06 runs in {root} are not comparable (profiles: {shown}); "
                        "keep one profile there, pass another --results-dir, or --no-inherit-best")
    (profile, experiments), = runs.items()
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in experiments.values())))
    if not seeds:
        raise UserError(f"--inherit-best: the finished 01-06 experiments in {root} share no seed "
                        f"({', '.join(f'{e}: {sorted(s)}' for e, s in experiments.items())}); --no-inherit-best")
    scores = {name: np.mean([by_seed[s]["best_val_acc"] for s in seeds]) for name, by_seed in experiments.items()}
    name = max(scores, key=scores.get)
    config = experiments[name][seeds[0]]["config"]
    recipe = {k: config[k] for k in RECIPE_FIELDS if k in config}
    return recipe, (f"{name}: best mean validation accuracy {100 * scores[name]:.2f}% over seeds {seeds} among "
                    f"{len(scores)} finished 01-06 experiment(s) of one profile in {root}")
