"""Finished runs read back: for the report, the figures and 07's opt-in recipe inheritance."""
import json
import re
from pathlib import Path

import numpy as np

from .data import DOMAINS
from .errors import UserError
from .lifecycle import run_dir
from .plumbing import readable_file



FINISHED_KEYS = dict(config=dict, test=dict, data=dict, best_val_acc=float, wall_time_s=float, device_name=str,
                     precision=str)


def finished_files(root, experiments):
    """root/<experiment>/seed-<K>/metrics.json: finished sets only (not .partial staging nor .old)."""
    return [p for p in sorted(Path(root).glob(f"{experiments}/seed-*/metrics.json"))
            if re.fullmatch(r"seed-\d+", p.parent.name)]


MAX_METRICS_BYTES = 64 << 20  # a real metrics.json is under 1 MB; more is not one of ours (or a device file)


def read_metrics(path):
    """A metrics.json, or None with the reason when it is unreadable or not ours. Only regular files of a bounded
    size are read (a FIFO would block, a device never end). Finished runs are checked for every key the report
    and 07's recipe choice read, and every accuracy must be a fraction: a finite number in [0, 1]."""
    path = Path(path)
    try:
        metrics = json.loads(readable_file(path, max_bytes=MAX_METRICS_BYTES).read_text())
    except UserError as e:
        return None, str(e).replace(f"{path} is ", "").replace(f"{path} ", "")
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested past the parser's limit
        return None, f"unreadable ({type(e).__name__})"
    if not (isinstance(metrics, dict) and isinstance(metrics.get("config"), dict)):
        return None, "not a metrics.json of this project"
    if metrics.get("status") == "finished":
        bad = [k for k, kind in FINISHED_KEYS.items()
               if not isinstance(metrics.get(k), (int, float) if kind is float else kind)]
        bad += [f"test.{k}" for k in ("svhn", "mnist") if not fraction(metrics.get("test", {}).get(k))]
        if not bad and not fraction(metrics["best_val_acc"]):
            bad.append("best_val_acc")
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


def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fraction(value):
    """An accuracy as metrics.json stores it: a finite number in [0, 1] (NaN, booleans and 7.5 are not)."""
    return number(value) and 0 <= value <= 1


def accuracies(mapping):
    """{domain: accuracy} of a metrics.json field, keeping numbers only (a foreign or garbled field gives {})."""
    return {d: v for d, v in mapping.items() if d in DOMAINS and fraction(v)} if isinstance(mapping, dict) else {}
