"""The verbs every script's procedure is made of, and run(): the procedure of 01-06.

    with start(cfg) as run:                     # lock, staging folder, checkpoint to resume, provenance
        data = load_data(run)                   # source train/val; every present domain's test set; dev sets
        model = new_model(run, data)            # new_model(run, data, source) starts from another run's model
        train(run, model, data)                 # fit(): the epoch is chosen on the source validation split
        results = test(run, model, data)        # every present digit domain, and the dev sets
        results.update(adapt(run, model, data))  # --tta: each target and dev domain on its own copy
        finish(run, model, data, results)       # plots, model.pt, metrics.json; swapped in whole

07, 08 and 09 write their own procedure with these verbs; launch(main, cfg) runs it as a process.
"""
import contextlib
import dataclasses
import random
import shlex
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import data as datasets, distributed, plumbing
from .augment import augment
from .config import Config
from .errors import UserError
from .models import build_model, imagenet_weights_file, set_input_stats
from .plumbing import read_torch, run_lock, save_torch, staging_dir, swap_in, write_json
from .results import (environment, load_checkpoint, plot_augmented, plot_confusion, plot_curves, restore_checkpoint,
                      run_dir, save_checkpoint, saved_epochs, write_history)
from .train import (Diverged, Progress, configure_backends, evaluate, fit, grad_scaler, make_optimizer, make_schedule,
                    pick_device, pick_precision, progress_bar, steps_per_epoch)
from .tta import adapted_accuracy

QUICK_IMAGES = 256
# What a model.pt fixes about the network: a run initialized from it (08) takes these from it.
MODEL_FIELDS = ("arch", "norm", "input_norm", "width", "transfer_input")


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    """What one training run holds while it goes: its config, where it writes, how it computes, what it has
    done (progress) and what it will record (the provenance of metrics.json)."""
    cfg: object
    out: Path                       # the finished set: <results>/<name>/seed-K/
    staging: Path                   # where everything is written until it is swapped in whole
    device: torch.device
    precision: str
    checkpoint: dict = None         # the interrupted run this one resumes
    provenance: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    clock: float = field(default_factory=time.perf_counter)

    @property
    def main(self):
        return distributed.is_main()

    def elapsed(self):
        before = self.checkpoint["progress"].get("elapsed", 0.0) if self.checkpoint else 0.0
        return before + time.perf_counter() - self.clock

    def metrics(self, status, **extra):
        p = self.progress
        return dict(status=status, **self.provenance, history=p.history, steps=p.steps, best_epoch=p.best_epoch,
                    best_val_acc=p.best_val_acc, wall_time_s=self.elapsed(), **extra)

    def write_status(self, status, **extra):
        if self.main:
            write_json(self.staging / "metrics.json", self.metrics(status, **extra))

    def record_failure(self, status, **extra):
        """Best effort: on a full disk this write fails too, and the original error is the one to report."""
        try:
            self.write_status(status, **extra)
        except OSError:
            pass


def resolve(cfg):
    """Apply the --quick smoke profile: a few hundred images, one epoch, results under quick/. A size or epoch
    count passed on the command line is kept, not overridden."""
    if not cfg.quick:
        return cfg
    profile = dict(epochs=1, train_subset=min(cfg.train_subset or QUICK_IMAGES, QUICK_IMAGES),
                   eval_subset=min(cfg.eval_subset or QUICK_IMAGES, QUICK_IMAGES))
    return dataclasses.replace(cfg, **{k: v for k, v in profile.items() if k not in cfg.passed})


def prepare_staging(out, cfg):
    """The staging folder, emptied unless resuming; saved epochs are never discarded unless --restart says so.
    Under torchrun rank 0 prepares it and every rank reads the checkpoint."""
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_config(cfg, out):
    """What this run is, in a few lines: where it reads and writes, and what differs from 01_base's defaults
    (metrics.json records every field)."""
    base = dataclasses.asdict(Config())
    said = ("name", "seed", "data_dir", "results_dir", "overrides")
    changed = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()
                       if k not in said and (v != base[k] if k in base else v))  # a script's own knobs: when on
    print(f"{cfg.name}, seed {cfg.seed}: data {cfg.data_dir}, writing {out}")
    print(textwrap.fill(changed or "none", width=110, initial_indent="differs from 01_base: ",
                        subsequent_indent="    "), flush=True)


@contextlib.contextmanager
def start(cfg, **provenance):
    """Open a run of cfg: its folder locked (rank 0), its staging folder ready, the checkpoint to resume read,
    seeds set. A failure inside is recorded in the staged metrics.json ("interrupted", "diverged", "failed")
    and re-raised; launch() turns it into an exit code."""
    cfg = resolve(cfg)
    device = distributed.setup(pick_device(cfg.device))
    distributed.check_same_config({k: v for k, v in dataclasses.asdict(cfg).items()  # paths may differ per node
                                   if k not in ("overrides", "data_dir", "results_dir")})
    out = run_dir(cfg)
    with contextlib.ExitStack() as held:
        distributed.on_main(lambda: held.enter_context(run_lock(out)))  # rank 0 alone writes
        precision = pick_precision(cfg.amp, device)
        backends = configure_backends(device, cfg.deterministic)
        staging, checkpoint = prepare_staging(out, cfg)
        if cfg.arch == "imagenet_resnet18" and cfg.pretrained and not (checkpoint or provenance.get("init_from")):
            imagenet_weights_file(cfg.weights)  # fail before the data is loaded, not after
        run = Run(cfg, out, staging, device, precision, checkpoint)
        run.provenance = dict(name=cfg.name, config=dataclasses.asdict(cfg), command="python " + shlex.join(sys.argv),
                              started=now(), **environment(device, precision),
                              grad_scaler=precision == "fp16", **backends, world_size=distributed.world_size(),
                              backend=distributed.backend(),
                              batchnorm_stats="synchronized" if distributed.synchronized_bn(device, cfg) else "per process",
                              **provenance)
        if run.main:
            print_config(cfg, out)
        seed_everything(cfg.seed)
        with recorded_failures(run):
            yield run


@contextlib.contextmanager
def recorded_failures(run):
    """What a stopped run leaves: its status in the staged metrics.json, and on rank 0 how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        run.record_failure("interrupted")
        if run.main:
            print(f"\ninterrupted: {resume_hint(run)}", file=sys.stderr)
        raise
    except Diverged as e:
        run.record_failure("diverged", error=str(e))
        saved = saved_epochs(run.staging / "checkpoint.pt")
        last = (f"the last good checkpoint ({saved} epoch(s)) is {run.staging / 'checkpoint.pt'}" if saved else
                "No epoch finished before it")
        raise Diverged(f"{e}. {last}; this run's results were not written") from None
    except BaseException as e:
        run.record_failure("failed", error=f"{type(e).__name__}: {e}")
        raise


def resume_hint(run):
    saved = saved_epochs(run.staging / "checkpoint.pt")
    args = [a for a in sys.argv[1:] if a != "--restart"] + (["--resume"] if saved and not run.cfg.resume else [])
    launcher = ["torchrun", f"--nproc-per-node={distributed.world_size()}"] if distributed.world_size() > 1 else ["python"]
    done = f"{saved} epoch(s) are saved; resume with" if saved else "no epoch finished; rerun"
    return f"{done}: {shlex.join(launcher + [sys.argv[0]] + args)}"


# --- data ------------------------------------------------------------------------------------------------

@dataclass
class Data:
    """A run's images, uint8 on its device, each split as (images, labels)."""
    train: tuple
    val: tuple
    tests: dict     # {domain: split}: the test split of every present domain, the source's included
    dev: dict       # {domain: split}: training files of other domains, never trained on: they choose recipes
    skipped: dict   # {domain: where its files were looked for}: optional domains that are absent


def labelled_split(labels, cfg):
    """(train, val) indices into the training file. --train-subset N is the whole label budget: N images
    drawn with the run's seed (so seeds resample which images are labelled), validation carved out of them.
    Without it, validation is a fixed 5% of the file, the same for every run and seed."""
    labelled = torch.arange(len(labels))
    if cfg.train_subset:
        labelled = datasets.stratified_subset(labels, cfg.train_subset, seed=cfg.seed, what="--train-subset")
    train_pos, val_pos = datasets.split_train_val(len(labelled), cfg.val_fraction)
    if len(train_pos) == 0:
        raise UserError(f"--train-subset {len(labelled)} leaves no training image after the validation split")
    return labelled[train_pos], labelled[val_pos]


def capped(split, cap, device):
    """A stratified subset of at most `cap` images (0: all), moved to the device."""
    x, y = split
    keep = datasets.stratified_subset(y, cap) if 0 < cap < len(y) else slice(None)
    return x[keep].to(device), y[keep].to(device)


def dev_domains(source):
    """Selection domains: every other domain's training file, but never SVHN's when SVHN is not the source:
    SVHN is the held-out domain of the MNIST-trained models and informs no choice."""
    return [d for d in datasets.DOMAINS if d not in (source, "svhn")]


def load_domains(cfg, device):
    """(tests, dev, skipped): the test split of every present domain, the dev sets of cfg.dataset, and the
    optional domains whose files are absent, named with where they were looked for."""
    tests, dev, skipped = {}, {}, {}
    for domain in datasets.DOMAINS:
        test_split = datasets.load(domain, "test", cfg.data_dir)
        if test_split is None:
            skipped[domain] = datasets.where(domain, cfg.data_dir)
            continue
        tests[domain] = capped(test_split, cfg.eval_subset, device)
        dev_split = datasets.load(domain, "train", cfg.data_dir) if domain in dev_domains(cfg.dataset) else None
        if dev_split is not None:
            dev[domain] = capped(dev_split, min(cfg.eval_subset or cfg.dev_images, cfg.dev_images), device)
    if skipped and distributed.is_main():
        print("skipped domains (files absent): " + "; ".join(f"{datasets.TITLES[d]} ({w})" for d, w in skipped.items()))
    return tests, dev, skipped


def load_data(run):
    """The source's train/val split, the test split of every present domain and the dev sets. An optional
    domain whose files are absent is skipped and named, once."""
    cfg, device = run.cfg, run.device
    x, y = datasets.load(cfg.dataset, "train", cfg.data_dir)
    train_idx, val_idx = labelled_split(y, cfg)
    if cfg.eval_subset:
        val_idx = val_idx[datasets.stratified_subset(y[val_idx], min(cfg.eval_subset, len(val_idx)))]
    data = Data((x[train_idx].to(device), y[train_idx].to(device)), (x[val_idx].to(device), y[val_idx].to(device)),
                *load_domains(cfg, device))
    run.provenance.update(labels_used=len(data.train[1]) + len(data.val[1]), skipped_domains=data.skipped,
                          selection=dict(epoch=f"{cfg.dataset} validation split", recipe=sorted(data.dev)),
                          data=dict(train=len(data.train[1]), val=len(data.val[1]),
                                    **{f"dev_{k}": len(v[1]) for k, v in data.dev.items()},
                                    **{f"test_{k}": len(v[1]) for k, v in data.tests.items()}))
    return data


def input_stats(images):
    """Per-channel mean and std of the training split (a 10k sample is exact to 3 decimals)."""
    sample = images[:10_000].float() / 255
    return sample.mean((0, 2, 3)).tolist(), sample.std((0, 2, 3)).clamp(min=1e-3).tolist()


# --- models ----------------------------------------------------------------------------------------------

def load_run_model(name, cfg):
    """(model.pt of experiment `name` for cfg's seed and profile, its path): what 08 starts from."""
    path = run_dir(dataclasses.replace(cfg, name=name)) / "model.pt"
    if not path.exists():
        raise UserError(f"no trained model at {path}: run `python {name}.py{' --quick' if cfg.quick else ''} "
                        f"--seed {cfg.seed}` first")
    return read_model_file(path, MODEL_FIELDS, f"rerun {name}.py"), path


def read_model_file(path, fields, remedy):
    """A model.pt this project wrote: {"model": state dict, "config": {...}} with at least `fields` in the config."""
    saved = read_torch(path, remedy)
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


def new_model(run, data, source=None):
    """The config's network on the run's device, inputs normalized with the training split's statistics.
    With `source` (state, path) from load_run_model: its weights, but still this training split's statistics,
    so a fine-tuned model sees its own data centred as a model trained from scratch on it would."""
    cfg, stats = run.cfg, input_stats(data.train[0])
    model = build_model(cfg, *stats, pretrained=cfg.pretrained and source is None and run.checkpoint is None)
    if source:
        state, path = source
        load_weights(model, state["model"], path, f"; rerun {path.parent.parent.name}.py")
        if cfg.arch == "resnet18" and cfg.input_norm == "dataset":
            set_input_stats(model, *stats)
    return model.to(run.device, memory_format=torch.channels_last)


# --- train, test, adapt, finish --------------------------------------------------------------------------

def fingerprint(split):
    """Cheap identity of a training split: its size, label sum and a pixel sum of a subsample."""
    x, y = split
    return f"{len(y)}:{int(y.sum())}:{int(x[:, :, ::4, ::4].sum())}"


def check_context(saved, now, path):
    """--resume continues the very run it saved: the same number of processes and the same training images."""
    if saved.get("world_size", now["world_size"]) != now["world_size"]:
        launcher = f"torchrun --nproc-per-node {saved['world_size']}" if saved["world_size"] > 1 else "python"
        raise UserError(f"--resume: {path} was saved by {saved['world_size']} process(es), this is {now['world_size']}: "
                        f"resume with {launcher}")
    if saved.get("data", now["data"]) != now["data"]:
        raise UserError(f"--resume: {path} trained on other images than --data-dir now holds (fingerprint "
                        f"{saved['data']} vs {now['data']}); pass the same --data-dir, or --restart")



def train(run, model, data):
    """fit() from scratch or from the checkpoint, a checkpoint and the live metrics.json after every epoch."""
    cfg = run.cfg
    optimizer = make_optimizer(cfg, model)
    schedule = make_schedule(cfg, optimizer, steps_per_epoch(len(data.train[1]), cfg.batch_size))
    scaler = grad_scaler(run.device, run.precision)
    context = dict(world_size=distributed.world_size(), data=fingerprint(data.train))
    if run.checkpoint:
        check_context(run.checkpoint.get("context", {}), context, run.staging / "checkpoint.pt")
        restore_checkpoint(run.checkpoint, run.staging / "checkpoint.pt", model, optimizer, schedule, scaler)
        try:
            run.progress = Progress(**run.checkpoint["progress"])
        except TypeError:
            raise UserError(f"--resume: {run.staging / 'checkpoint.pt'} has no readable progress; start afresh "
                            "with --restart") from None
        if run.main:
            print(f"resuming after epoch {run.progress.epoch} from {run.staging / 'checkpoint.pt'}")
    run.write_status("running")

    def end_of_epoch(progress):
        progress.elapsed = run.elapsed()
        if run.main:
            save_checkpoint(run.staging / "checkpoint.pt", cfg, model, optimizer, schedule, scaler, progress, context)
            run.write_status("running")
            write_history(run.staging / "history.csv", progress.history)
    return fit(model, optimizer, schedule, cfg, data.train, data.val, run.precision, run.progress, end_of_epoch, scaler)


def test(run, model, data):
    """The chosen epoch's accuracy on every present domain's test split (with confusion matrices) and on the
    dev sets. Evaluation is never augmented. Rank 0 only (an empty dict elsewhere)."""
    if not run.main:
        return {}
    model.load_state_dict(run.progress.best_weights)
    results = dict(test={}, confusion={}, dev={})
    for domain, (x, y) in data.tests.items():
        _, results["test"][domain], predictions = evaluate(model, x, y, run.precision, desc=f"test {datasets.TITLES[domain]}")
        results["confusion"][domain] = torch.bincount(y * 10 + predictions, minlength=100).view(10, 10).tolist()
    for domain, (x, y) in data.dev.items():
        results["dev"][domain] = evaluate(model, x, y, run.precision, desc=f"dev {datasets.TITLES[domain]}")[1]
    return results


def adapt(run, model, data):
    """{"test_tta": {method: {domain: accuracy}}, "dev_tta": ...}: each test-time adaptation (--tta) to each target
    domain's unlabelled test split, and to each dev set (other domains' unlabelled train images: where a method
    and its settings are chosen), each on its own copy of the model, beside (never instead of) the source-only
    numbers. Rank 0 only; --tta none: empty."""
    if not run.main:
        return {}
    cfg = run.cfg
    methods = [m for m in cfg.tta.split(",") if m != "none"]
    targets = {d: split for d, split in data.tests.items() if d != cfg.dataset}
    jobs = [(key, m, d, split) for key, sets in (("test_tta", targets), ("dev_tta", data.dev)) for m in methods
            for d, split in sets.items()]
    results = {"test_tta": {m: {} for m in methods}, "dev_tta": {m: {} for m in methods}}
    for key, method, domain, split in progress_bar(jobs, "test-time adaptation"):
        results[key][method][domain] = adapted_accuracy(model, *split, method, run.precision, cfg)
    return results


def finish(run, model, data, results):
    """Write the finished set into staging (plots and model first, metrics.json with status finished last, so
    a staged metrics.json saying "finished" means the set is whole), then swap it in. Returns the metrics."""
    if not run.main:
        return None
    cfg, staging = run.cfg, run.staging
    for domain in results["confusion"]:
        if domain != cfg.dataset:
            accuracy = 100 * results["test"][domain]
            plot_confusion(results["confusion"][domain], f"{cfg.name}: {datasets.TITLES[domain]} test ({accuracy:.1f}%)",
                           staging / f"confusion_{domain}.png")
    plot_curves(run.progress, cfg.name, staging)
    write_history(staging / "history.csv", run.progress.history)
    if cfg.augments:
        originals = data.train[0][:8]
        plot_augmented(originals / 255, [augment(originals, cfg, key) for key in range(4)], staging / "augmented.png")
    save_torch(staging / "model.pt", dict(config=dataclasses.asdict(cfg), model=run.progress.best_weights))
    metrics = run.metrics("finished", **{"test_tta": {}, "dev_tta": {}, **results}, finished=now())
    write_json(staging / "metrics.json", metrics)
    (staging / "checkpoint.pt").unlink(missing_ok=True)
    swap_in(staging, run.out)
    print_result(run, metrics)
    return metrics


def print_result(run, metrics):
    test = " | ".join(f"{datasets.TITLES[d]} {100 * v:.2f}%" for d, v in metrics["test"].items())
    dev = ", ".join(f"{datasets.TITLES[d]} {100 * v:.2f}%" for d, v in metrics["dev"].items())
    print(f"test (epoch {run.progress.best_epoch}, chosen on validation): {test} | dev (train files): {dev or '—'} | "
          f"{metrics['wall_time_s']:.0f}s on {metrics['device_name']} ({run.precision})")
    for split in ("test", "dev"):
        for method, by_domain in metrics[f"{split}_tta"].items():
            print(f"{split} after --tta {method}: "
                  + " | ".join(f"{datasets.TITLES[d]} {100 * v:.2f}%" for d, v in by_domain.items()))
    print(f"wrote {run.out}/: {' '.join(sorted(p.name for p in run.out.iterdir()))}")


# --- procedures ------------------------------------------------------------------------------------------

def train_and_test(cfg, source=None, **provenance):
    """The procedure of 01-06 (and of each point of 08's sweep): train, test everywhere, adapt if asked."""
    with start(cfg, **provenance) as run:
        data = load_data(run)
        model = new_model(run, data, source)
        train(run, model, data)
        results = test(run, model, data)
        results.update(adapt(run, model, data))  # --tta none: empty
        return finish(run, model, data, results)


def evaluate_saved(cfg):
    """--evaluate PATH: test a saved model.pt on every present domain, with --tta if asked, without training.
    The network and the evaluation profile (eval_subset) are the file's; writes <its folder>.evaluation.json,
    never the run's own metrics.json."""
    path = Path(cfg.evaluate)
    if not path.exists():
        raise UserError(f"--evaluate {path}: no such file")
    saved = read_model_file(path, MODEL_FIELDS + ("dataset", "eval_subset"), "pass a model.pt this project wrote")
    try:
        built = dataclasses.replace(cfg, **{k: saved["config"][k] for k in MODEL_FIELDS + ("dataset", "eval_subset")},
                                    evaluate="", overrides="")
    except UserError as e:
        raise UserError(f"{path} holds a network this project cannot build ({e})") from None
    device = pick_device(cfg.device)
    run = Run(built, out=None, staging=None, device=device, precision=pick_precision(cfg.amp, device))
    model = build_model(built, [0.0] * 3, [1.0] * 3, pretrained=False)  # the Normalize buffers come with the weights
    load_weights(model, saved["model"], path)
    model.to(device, memory_format=torch.channels_last)
    run.progress.best_weights = saved["model"]
    data = Data(None, None, *load_domains(built, device))
    results = test(run, model, data)
    results.update(adapt(run, model, data))
    out = path.parent.with_name(path.parent.name + ".evaluation.json")
    write_json(out, dict(model=str(path), config=dataclasses.asdict(built), command="python " + shlex.join(sys.argv),
                         **environment(device, run.precision), skipped_domains=data.skipped, finished=now(), **results))
    for split in ("test", "dev"):
        for domain, accuracy in results[split].items():
            adapted = "".join(f" | after --tta {m} {100 * r[domain]:.2f}%"
                              for m, r in results[f"{split}_tta"].items() if domain in r)
            print(f"{datasets.TITLES[domain]:8} {split:4} {100 * accuracy:.2f}%{adapted}")
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
