"""Where a run's files go, and writing them so that none is ever half-written: metrics.json, plots,
checkpoints, the model, and reading finished runs back (for 07's recipe and the report)."""
import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import random
import re
import shutil
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
RESUMABLE_CHANGES = {"resume", "restart", "data_dir", "results_dir", "overrides", "inherited_from", "tta"}
UMASK = os.umask(0)
os.umask(UMASK)  # read once: mkstemp's files are 0600, ours get what the user's umask allows


def run_dir(cfg):
    """<results-dir>[/quick]/<name>/seed-<seed>: smoke runs never overwrite real ones."""
    root = Path(cfg.results_dir) / "quick" if cfg.quick else Path(cfg.results_dir)
    return root / cfg.name / f"seed-{cfg.seed}"


def staging_dir(out):
    """Where a run of `out` writes everything (checkpoint, live metrics.json, then the finished files)."""
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def run_lock(out):
    """One run per folder at a time: a second run of the same experiment and seed is refused, not raced.
    The lock is the kernel's (flock), so a killed run never leaves a stale one."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".write-test-")  # a new file: an old one proves nothing
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write results to {out.parent} ({e.strerror}); pass a writable --results-dir") from None
    with open(out.with_name(out.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserError(f"another run is writing {out} (pid {lock.read().strip() or '?'}); "
                            "wait for it, or pass another --seed or --results-dir") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        recover_swap(out)
        yield


def swap_in(staging, out):
    """Replace the finished set `out` by `staging` whole: two renames, and recover_swap() completes or undoes
    a swap that a crash cut between them. Never a folder mixing two runs."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(out):
    old, staging = out.with_name(out.name + ".old"), staging_dir(out)
    if not old.exists():
        return
    if not out.exists():  # finish() writes the staged metrics.json last: "finished" there means the set is whole
        try:
            complete = json.loads((staging / "metrics.json").read_text()).get("status") == "finished"
        except (OSError, ValueError, AttributeError):
            complete = False
        os.replace(staging if complete else old, out)
    shutil.rmtree(old, ignore_errors=True)


def _atomic(path, write):
    """write(tmp_path) beside `path`, then rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text):
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")  # bare NaN is not JSON


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


CHECKPOINT_KEYS = ("config", "model", "optimizer", "schedule", "scaler", "progress", "rng")


def save_checkpoint(path, cfg, model, optimizer, schedule, scaler, progress):
    save_torch(path, dict(config=dataclasses.asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                          schedule=schedule.state_dict(), scaler=scaler.state_dict(), progress=dict(vars(progress)),
                          rng=rng_states()))


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


def read_torch(path, remedy):
    """torch.load(weights_only=True) of one of our files as a dict, or a UserError naming it and the remedy."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); {remedy}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not one of this project's files; {remedy}")
    return obj


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
    except (OSError, ValueError) as e:
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


PROFILE_FIELDS = ("dataset", "train_subset", "eval_subset", "val_fraction", "epochs")


def best_recipe(cfg):
    """The recipe (RECIPE_FIELDS) of the finished 01-06 experiment with the best mean validation accuracy,
    ranked only among comparable runs: one profile (PROFILE_FIELDS: same data, budget and validation) and the
    seeds every competitor finished. Runs of several profiles are refused, not mixed. Quick runs only choose
    among quick runs."""
    root = run_dir(cfg).parent.parent
    runs, skipped = {}, []
    for path in finished_files(root, "0[1-6]_*"):
        metrics, problem = read_metrics(path)
        if metrics is None:
            skipped.append(path)
        elif metrics.get("status") == "finished":
            config = metrics["config"]
            if any(k not in config for k in PROFILE_FIELDS + ("seed",)):
                skipped.append(path)
                continue
            profile = tuple(config[k] for k in PROFILE_FIELDS)
            runs.setdefault(profile, {}).setdefault(path.parent.parent.name, {})[config["seed"]] = metrics
    if skipped:
        print(f"07's recipe: skipping unreadable or incomplete runs: {', '.join(map(str, skipped))}")
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
