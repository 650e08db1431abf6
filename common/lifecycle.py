"""A run's life: the device and precision it computes in, its folder (locked, staged, swapped in whole), the
checkpoint it saves and resumes from, and the provenance its metrics.json records.

    with start(cfg) as trial:   # Trial: the config, folders, device, precision, progress and provenance of one run
        ...                     # the verbs of common.experiment do the science inside
"""
import contextlib
import dataclasses
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision

from . import distributed
from .config import Config
from .errors import UserError
from .models import imagenet_weights_file
from .plumbing import read_torch, run_lock, save_torch, staging_dir, write_json, write_text
from .training import Diverged, Progress


# --- device and precision --------------------------------------------------------------------------------

def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


CPUINFO = "/proc/cpuinfo"  # a module constant so that tests can point it at another CPU's answers


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX (x86), or the bf16 extension (Arm): bf16 matmuls in hardware. Plain AVX-512 only
    emulates them, slower than fp32, so it does not count."""
    try:
        with open(CPUINFO) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def native_bf16(device):
    """torch.cuda.is_bf16_supported() is True on pre-Ampere cards too (it counts emulation): ask the capability."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return cpu_has_native_bf16()


def pick_precision(amp, device):
    """bf16 autocast where the hardware runs bf16 natively; fp16 autocast with a GradScaler on older CUDA
    cards (T4, V100: tensor cores do fp16 only); fp32 elsewhere. The speed-up: README "Speed"."""
    if amp == "bf16" and not native_bf16(device):
        hint = "--amp fp16 (compute capability < 8.0)" if device.type == "cuda" else "--amp off"
        raise UserError(f"--amp bf16: this {device.type} has no native bf16; use {hint}")
    if amp == "auto":
        return "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
    return "fp32" if amp == "off" else amp


def configure_backends(device, deterministic):
    """cuDNN autotuning on (our shapes never change) unless deterministic kernels are asked for; returns what
    now holds, for metrics.json."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    ampere = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    tf32 = dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32) if ampere else None
    return dict(deterministic=deterministic, cudnn_benchmark=torch.backends.cudnn.benchmark, tf32=tf32)


# --- folders, provenance, checkpoints --------------------------------------------------------------------

# Fields that may change between an interrupted run and its --resume without changing the result.
RESUMABLE_CHANGES = {"resume", "restart", "data_dir", "results_dir", "overrides", "tta", "blind"}


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


# --- the trial: one run from start() to its swapped-in results ---------------------------------------------

QUICK_IMAGES = 256


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Trial:
    """One training run while it goes: its config, where it writes, how it computes, what it has done
    (progress) and what it will record (the provenance of metrics.json)."""
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

    def restore(self, model, optimizer, schedule, scaler, train_split):
        """--resume: model, optimizer, schedule, scaler, random states and progress as the checkpoint left them,
        after checking that it is the same run (process count, training images). Then the live status."""
        self.context = dict(world_size=distributed.world_size(), data=fingerprint(train_split))
        if self.checkpoint:
            path = self.staging / "checkpoint.pt"
            check_context(self.checkpoint.get("context", {}), self.context, path)
            restore_checkpoint(self.checkpoint, path, model, optimizer, schedule, scaler)
            try:
                self.progress = Progress(**self.checkpoint["progress"])
            except TypeError:
                raise UserError(f"--resume: {path} has no readable progress; start afresh with --restart") from None
            if self.main:
                print(f"resuming after epoch {self.progress.epoch} from {path}")
        self.write_status("running")

    def saver(self, model, optimizer, schedule, scaler):
        """fit()'s end-of-epoch call: the checkpoint, the live metrics.json and history.csv (rank 0)."""
        def end_of_epoch(progress):
            progress.elapsed = self.elapsed()
            if self.main:
                save_checkpoint(self.staging / "checkpoint.pt", self.cfg, model, optimizer, schedule, scaler, progress,
                                self.context)
                self.write_status("running")
                write_history(self.staging / "history.csv", progress.history)
        return end_of_epoch


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
        trial = Trial(cfg, out, staging, device, precision, checkpoint)
        trial.provenance = dict(name=cfg.name, config=dataclasses.asdict(cfg), command="python " + shlex.join(sys.argv),
                                started=now(), **environment(device, precision),
                                grad_scaler=precision == "fp16", **backends, world_size=distributed.world_size(),
                                backend=distributed.backend(), batchnorm_stats="synchronized"
                                if distributed.synchronized_bn(device, cfg) else "per process", **provenance)
        if trial.main:
            print_config(cfg, out)
        seed_everything(cfg.seed)
        with recorded_failures(trial):
            yield trial


@contextlib.contextmanager
def recorded_failures(trial):
    """What a stopped run leaves: its status in the staged metrics.json, and on rank 0 how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        trial.record_failure("interrupted")
        if trial.main:
            print(f"\ninterrupted: {resume_hint(trial)}", file=sys.stderr)
        raise
    except Diverged as e:
        trial.record_failure("diverged", error=str(e))
        saved = saved_epochs(trial.staging / "checkpoint.pt")
        last = (f"the last good checkpoint ({saved} epoch(s)) is {trial.staging / 'checkpoint.pt'}" if saved else
                "No epoch finished before it")
        raise Diverged(f"{e}. {last}; this run's results were not written") from None
    except BaseException as e:
        trial.record_failure("failed", error=f"{type(e).__name__}: {e}")
        raise


def resume_hint(trial):
    saved = saved_epochs(trial.staging / "checkpoint.pt")
    args = [a for a in sys.argv[1:] if a != "--restart"] + (["--resume"] if saved and not trial.cfg.resume else [])
    launcher = ["torchrun", f"--nproc-per-node={distributed.world_size()}"] if distributed.world_size() > 1 else ["python"]
    done = f"{saved} epoch(s) are saved; resume with" if saved else "no epoch finished; rerun"
    return f"{done}: {shlex.join(launcher + [sys.argv[0]] + args)}"


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


HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def write_history(path, history):
    """history.csv beside metrics.json: one row per epoch, for spreadsheets and pandas."""
    rows = [",".join(HISTORY_COLUMNS)] + [",".join(repr(h.get(k, "")) for k in HISTORY_COLUMNS) for h in history]
    write_text(path, "\n".join(rows) + "\n")
