"""The verbs every script's procedure is made of, and run(): the procedure of 01-06.

    with start(cfg) as trial:                     # lock, staging folder, checkpoint to resume, provenance
        data = load_data(trial)                   # source train/val; every present domain's test set; dev sets
        model = new_model(trial, data)            # new_model(trial, data, source) starts from another run's model
        train(trial, model, data)                 # fit(): the epoch is chosen on the source validation split
        results = test(trial, model, data)        # every present digit domain, and the dev sets
        results.update(adapt(trial, model, data)) # --tta: each target and dev domain on its own copy
        finish(trial, model, data, results)       # plots, model.pt, metrics.json; swapped in whole

07, 08 and 09 write their own procedure with these verbs; launch(main, cfg) runs it as a process. A run's
life (folders, checkpoints, resume, provenance, device, precision) is common.lifecycle's.
"""
import dataclasses
import re
import shlex
import sys
from pathlib import Path

import torch

from . import distributed, plumbing
from .augment import augment
from .data import TITLES, Data, input_stats, load_domains, load_sets, sizes
from .config import Config, adapts_batchnorm
from .errors import UserError
from .lifecycle import Trial, environment, now, pick_device, pick_precision, run_dir, start, write_history
from .models import build_model, set_input_stats
from .plots import plot_augmented, plot_confusion, plot_curves, plot_sweep
from .plumbing import read_torch, save_torch, swap_in, write_json
from .training import evaluate, fit, grad_scaler, make_optimizer, make_schedule, progress_bar, steps_per_epoch
from .tta import adapted_accuracy

__all__ = ["adapt", "finish", "launch", "load_data", "new_model", "run", "start", "test", "train"]


def load_data(trial):
    """The source's train/val split, the test split of every present domain and the dev sets, on the trial's
    device; metrics.json records their sizes. An optional domain whose files are absent is skipped and named."""
    data = load_sets(trial.cfg, trial.device, announce=trial.main)
    trial.provenance.update(sizes(data, trial.cfg))
    return data


# What a model.pt fixes about the network: a run initialized from it (08) takes these from it.
MODEL_FIELDS = ("arch", "norm", "input_norm", "width", "transfer_input", "ibn")
# Network fields added after model.pt files were first written: a file without one was built with the default.
LATER_MODEL_FIELDS = ("ibn",)


def load_run_model(name, cfg):
    """(model.pt of experiment `name` for cfg's seed and profile, its path): what 08 starts from."""
    path = run_dir(Config(name=name, seed=cfg.seed, quick=cfg.quick, results_dir=cfg.results_dir)) / "model.pt"
    if not path.exists():
        raise UserError(f"no trained model at {path}: run `python {name}.py{' --quick' if cfg.quick else ''} "
                        f"--seed {cfg.seed}` first")
    return read_model_file(path, MODEL_FIELDS, f"rerun {name}.py"), path


def read_model_file(path, fields, remedy):
    """A model.pt this project wrote: {"model": state dict, "config": {...}} with at least `fields` in the config."""
    saved = read_torch(path, remedy)
    if isinstance(saved.get("config"), dict):
        defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.name in LATER_MODEL_FIELDS}
        saved["config"] = {**defaults, **saved["config"]}
    if not (isinstance(saved.get("model"), dict) and isinstance(saved.get("config"), dict)
            and all(k in saved["config"] for k in fields)):
        raise UserError(f"{path} is not a model.pt of this project: it lacks the model or its config (fields "
                        f"{', '.join(fields)}); {remedy}")
    return saved


def load_weights(model, state, path, remedy=""):
    """model.load_state_dict(state), a mismatch being one line that names the file."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path} does not fit the network its config describes ({str(e).splitlines()[0][:160]})"
                        f"{remedy}") from None


def network_of(cfg, source):
    """cfg with the network fields of the model it starts from; a conflicting flag is refused, not ignored."""
    path, built = source[1], source[0]["config"]
    conflicts = [f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (the model has {built[k]!r})"
                 for k in MODEL_FIELDS if k in cfg.passed and getattr(cfg, k) != built[k]]
    if conflicts:
        raise UserError(f"{cfg.name} starts from {path}, whose network is fixed: drop {', '.join(conflicts)}, "
                        f"or retrain {path.parent.parent.name} with them")
    try:
        return dataclasses.replace(cfg, **{k: built[k] for k in MODEL_FIELDS})
    except UserError as e:  # the file's fault, not a flag the user passed
        raise UserError(f"{path} holds a network this project cannot build ({e}); rerun "
                        f"{path.parent.parent.name}.py") from None


def new_model(trial, data, source=None):
    """The config's network on the run's device, inputs normalized as cfg.input_norm says: each image by itself
    ("image"), or with the training split's statistics ("dataset"). With `source` (state, path) from
    load_run_model: its weights; a "dataset" network then takes this training split's statistics (08 on SVHN
    centres SVHN, not MNIST), an "image" one needs none."""
    cfg, stats = trial.cfg, input_stats(data.source_train[0])
    model = build_model(cfg, *stats, pretrained=cfg.pretrained and source is None and trial.checkpoint is None)
    if source:
        state, path = source
        load_weights(model, state["model"], path, f"; rerun {path.parent.parent.name}.py")
        if cfg.arch == "resnet18" and cfg.input_norm == "dataset":
            set_input_stats(model, *stats)
    return model.to(trial.device, memory_format=torch.channels_last)


def train(trial, model, data):
    """fit() from scratch or from the checkpoint (--resume), a checkpoint and the live metrics.json after every
    epoch; the epoch is chosen on the source validation split."""
    cfg = trial.cfg
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer, steps_per_epoch(len(data.source_train[1]), cfg.batch_size))
    scaler = grad_scaler(trial.device, trial.precision)
    trial.restore(model, optimizer, schedule, scaler, data.source_train)
    return fit(model, optimizer, schedule, cfg, data.source_train, data.source_val, trial.precision, trial.progress,
               trial.saver(model, optimizer, schedule, scaler), scaler)


def test(trial, model, data):
    """The chosen epoch's accuracy on every present domain's test split (with confusion matrices) and on the
    dev sets. Evaluation is never augmented. Rank 0 only (an empty dict elsewhere)."""
    if not trial.main:
        return {}
    model.load_state_dict(trial.progress.best_weights)
    results = dict(test={}, confusion={}, dev={})
    for domain, (x, y) in data.test_sets.items():
        _, results["test"][domain], predictions = evaluate(model, x, y, trial.precision, desc=f"test {TITLES[domain]}")
        results["confusion"][domain] = torch.bincount(y * 10 + predictions, minlength=100).view(10, 10).tolist()
    for domain, (x, y) in data.dev_sets.items():
        results["dev"][domain] = evaluate(model, x, y, trial.precision, desc=f"dev {TITLES[domain]}")[1]
    return results


def adapt(trial, model, data):
    """{"test_tta": {method: {domain: accuracy}}, "dev_tta": ...}: each test-time adaptation (--tta) to each target
    domain's unlabelled test split, and to each dev set (other domains' unlabelled train images: where a method
    and its settings are chosen), each on its own copy of the model, beside (never instead of) the source-only
    numbers. Rank 0 only; --tta none: empty."""
    if not trial.main:
        return {}
    cfg = trial.cfg
    methods = [m for m in cfg.tta.split(",") if m != "none"]
    targets = {d: split for d, split in data.test_sets.items() if d != cfg.dataset}
    jobs = [(key, m, d, split) for key, sets in (("test_tta", targets), ("dev_tta", data.dev_sets)) for m in methods
            for d, split in sets.items()]
    results = {"test_tta": {m: {} for m in methods}, "dev_tta": {m: {} for m in methods}}
    for key, method, domain, split in progress_bar(jobs, "test-time adaptation"):
        results[key][method][domain] = adapted_accuracy(model, *split, method, trial.precision, cfg)
    return results


def finish(trial, model, data, results):
    """Write the finished set into staging (plots and model first, metrics.json with status finished last, so
    a staged metrics.json saying "finished" means the set is whole), then swap it in. Returns the metrics."""
    if not trial.main:
        return None
    cfg, staging = trial.cfg, trial.staging
    for domain in results["confusion"]:
        if domain != cfg.dataset:
            accuracy = "" if cfg.blind else f" ({100 * results['test'][domain]:.1f}%)"
            plot_confusion(results["confusion"][domain], f"{cfg.name}: {TITLES[domain]} test{accuracy}",
                           staging / f"confusion_{domain}.png")
    plot_curves(trial.progress, cfg.name, staging)
    write_history(staging / "history.csv", trial.progress.history)
    if cfg.augments:
        originals = data.source_train[0][:8]
        plot_augmented(originals / 255, [augment(originals, cfg, key) for key in range(4)], staging / "augmented.png")
    save_torch(staging / "model.pt", dict(config=dataclasses.asdict(cfg), model=trial.progress.best_weights))
    metrics = trial.metrics("finished", **{"test_tta": {}, "dev_tta": {}, **results}, finished=now())
    write_json(staging / "metrics.json", metrics)
    (staging / "checkpoint.pt").unlink(missing_ok=True)
    swap_in(staging, trial.out)
    print_result(trial, metrics)
    return metrics


def print_result(trial, metrics):
    test = ("in metrics.json, not shown (--blind)" if trial.cfg.blind
            else " | ".join(f"{TITLES[d]} {100 * v:.2f}%" for d, v in metrics["test"].items()))
    dev = ", ".join(f"{TITLES[d]} {100 * v:.2f}%" for d, v in metrics["dev"].items())
    print(f"test (epoch {trial.progress.best_epoch}, chosen on validation): {test} | dev (train files): {dev or '—'} | "
          f"{metrics['wall_time_s']:.0f}s on {metrics['device_name']} ({trial.precision})")
    for split in ("dev",) if trial.cfg.blind else ("test", "dev"):
        for method, by_domain in metrics[f"{split}_tta"].items():
            print(f"{split} after --tta {method}: "
                  + " | ".join(f"{TITLES[d]} {100 * v:.2f}%" for d, v in by_domain.items()))
    print(f"wrote {trial.out}/: {' '.join(sorted(p.name for p in trial.out.iterdir()))}")


# --- procedures ------------------------------------------------------------------------------------------

def train_and_test(cfg, source=None, **provenance):
    """The procedure of 01-06 (and of each point of 08's sweep): train, test everywhere, adapt if asked."""
    with start(cfg, **provenance) as trial:
        data = load_data(trial)
        model = new_model(trial, data, source)
        train(trial, model, data)
        results = test(trial, model, data)
        results.update(adapt(trial, model, data))  # --tta none: empty
        return finish(trial, model, data, results)


# What --evaluate uses of the command line: where the data is, how to compute, and the adaptation to run.
EVALUATION_FIELDS = {"evaluate", "data_dir", "device", "amp", "tta", "tent_lr", "tent_batch", "shot_lr", "t3a_filter",
                     "dev_images", "dev_only"}


def evaluation_config(cfg, path, saved):
    """The config an evaluation runs: the model's network, name, seed, source and evaluation profile, and
    this command's data, device and --tta. A flag it would not use is refused, not ignored."""
    unused = sorted(cfg.passed - EVALUATION_FIELDS)
    if unused:
        raise UserError(f"--evaluate tests a saved model: {', '.join('--' + k.replace('_', '-') for k in unused)} "
                        "would change nothing; drop it")
    taken = MODEL_FIELDS + ("name", "seed", "dataset", "eval_subset")
    if not all(k in saved["config"] for k in taken):
        raise UserError(f"{path} is not a model.pt of this project: its config lacks "
                        f"{', '.join(k for k in taken if k not in saved['config'])}; pass a model.pt this project wrote")
    tta = cfg.tta if "tta" in cfg.passed or saved["config"]["norm"] == "batch" else "none"  # a script's default --tta
    if adapts_batchnorm(tta) and saved["config"]["norm"] != "batch":  # the flag's fault, not the file's
        raise UserError(f"--tta {tta} adapts BatchNorm layers and {path} has none (trained with --norm "
                        f"{saved['config']['norm']}): pass --tta none or t3a")
    try:
        return dataclasses.replace(cfg, **{k: saved["config"][k] for k in taken}, tta=tta, evaluate="", dev_only=False,
                                   overrides="")
    except UserError as e:
        raise UserError(f"{path} holds a network this project cannot build ({e})") from None


def evaluation_file(path, dev_only=False):
    """Where an evaluation of `path` is written: <seed-K>.evaluation.json (.dev.json with --dev-only) beside a
    run's folder, else <model>.evaluation.json beside the file; never inside a run's own set."""
    path, suffix = Path(path).absolute(), ".evaluation.dev.json" if dev_only else ".evaluation.json"
    if re.fullmatch(r"seed-\d+", path.parent.name):
        return path.parent.with_name(path.parent.name + suffix)
    return path.with_name(path.stem + suffix)


def evaluate_saved(cfg):
    """--evaluate PATH: test a saved model.pt on every present domain, with --tta if asked, without training.
    The network, name, seed and evaluation profile (eval_subset) are the file's; writes evaluation_file(PATH),
    never the run's own metrics.json."""
    path = Path(cfg.evaluate)
    if not path.exists():
        raise UserError(f"--evaluate {path}: no such file")
    saved = read_model_file(path, MODEL_FIELDS, "pass a model.pt this project wrote")
    built = evaluation_config(cfg, path, saved)
    device = pick_device(cfg.device)
    trial = Trial(built, out=None, staging=None, device=device, precision=pick_precision(cfg.amp, device))
    model = build_model(built, [0.0] * 3, [1.0] * 3, pretrained=False)  # the Normalize buffers come with the weights
    load_weights(model, saved["model"], path)
    model.to(device, memory_format=torch.channels_last)
    trial.progress.best_weights = saved["model"]
    data = Data(None, None, *load_domains(built, device))  # no training: the source's splits are not needed
    if cfg.dev_only:
        data.test_sets = {}
    results = test(trial, model, data)
    results.update(adapt(trial, model, data))
    out = evaluation_file(path, cfg.dev_only)
    write_json(out, dict(model=str(path), config=dataclasses.asdict(built), command="python " + shlex.join(sys.argv),
                         **environment(device, trial.precision), skipped_domains=data.skipped, finished=now(), **results))
    for split in ("test", "dev"):
        for domain, accuracy in results[split].items():
            adapted = "".join(f" | after --tta {m} {100 * r[domain]:.2f}%"
                              for m, r in results[f"{split}_tta"].items() if domain in r)
            print(f"{TITLES[domain]:8} {split:4} {100 * accuracy:.2f}%{adapted}")
    print(f"wrote {out}")
    return results


def launch(main, cfg):
    """Run a script's procedure as a process (or, with --evaluate, test a saved model instead): exit codes and
    one-line errors (plumbing.process), the process group shut down at the end under torchrun."""
    stray = distributed.stray_environment()
    with plumbing.process(main_rank=stray is not None or distributed.is_main()):
        if stray:
            raise UserError(stray)
        try:
            evaluate_saved(cfg) if cfg.evaluate else main(cfg)
        finally:
            distributed.shutdown()


def run(cfg):
    """Entry point of 01-06."""
    launch(train_and_test, cfg)


def write_sweep(cfg, rows, out):
    """08 --sweep: sweep.json and label_efficiency.png (SVHN test accuracy against labelled images, per arm) in
    their own folder, beside the sweep's runs. Nothing to write without rows (ranks other than 0)."""
    if not rows:
        return
    write_json(out / "sweep.json", dict(config=dataclasses.asdict(cfg), rows=rows))
    plot_sweep(rows, cfg.dataset, cfg.init_from, out / "label_efficiency.png")
    print(f"wrote {out}/: sweep.json label_efficiency.png")
