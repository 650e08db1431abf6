"""Process and file-system plumbing, kept apart so that the science modules read without it.

What it guarantees, each tested (README "Guarantees"):
- A file written here is whole or absent: written beside its target, then renamed (write_text, write_json,
  save_torch). Its permissions follow the user's umask, read when a file is written, never changed.
- A run writes into `seed-K.partial/` and swap_in() replaces the finished `seed-K/` by it whole; a crash
  between the two renames is completed or undone by recover_swap() on the next run of that folder. A
  results folder never mixes two runs.
- One run per folder at a time (flock): a killed run never leaves a stale lock.
- As a process (`process()`): a UserError or a file-system fault is one line and exit 1, divergence exit 3,
  Ctrl-C 130, SIGTERM 143 (kill, docker stop, Slurm), each after the run saved what can be resumed.
- Under torchrun, a worker dies with its launcher (PR_SET_PDEATHSIG), so no orphan finishes a run behind a
  later --resume's back.
"""
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch

from .errors import UserError


# --- files that are whole or absent ----------------------------------------------------------------------

def umask():
    """The process umask, read without changing it where Linux tells it (/proc), else by the set-and-restore
    idiom at the moment of writing (never at import)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic(path, write):
    """write(tmp_path) beside `path`, then rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; the user's umask decides
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text):
    atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")  # bare NaN is not JSON


def save_torch(path, obj):
    """torch.save, atomically. torch reports a failed write (a full disk) as a RuntimeError: raised here as the
    OSError it is, so that it is one line like every other file-system fault."""
    def write(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            raise OSError(errno.EIO, f"writing failed ({str(e).splitlines()[0][:120]})", str(path)) from None
    atomic(path, write)


def readable_file(path, what="", max_bytes=None, inside=None):
    """The one door every file the project reads goes through: a regular file (a FIFO would block a read, a device
    never end), at most max_bytes, inside the folder `inside` when given (a name read from a file cannot lead out
    of its folder), that this process may read. Otherwise a UserError naming it. Returns the path."""
    path = Path(path)
    if inside is not None and not path.resolve().is_relative_to(Path(inside).resolve()):
        raise UserError(f"{what}{path} lies outside {inside}")
    if not path.is_file():
        raise UserError(f"{what}{path} is {'not a regular file' if path.exists() else 'missing'}")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise UserError(f"{what}{path} is over {max_bytes >> 20} MiB: not one of this project's files")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:  # a permission problem, not a corrupt file: say which
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    return path


def read_torch(path, remedy):
    """torch.load(weights_only=True) of one of our files as a dict, or a UserError naming it and the remedy."""
    readable_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    except Exception as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); {remedy}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not one of this project's files; {remedy}")
    return obj


# --- one folder per finished run, replaced whole ---------------------------------------------------------

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
    a swap that a crash cut between them."""
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
    if not out.exists():  # the staged metrics.json is written last: "finished" there means the set is whole
        try:
            complete = json.loads((staging / "metrics.json").read_text()).get("status") == "finished"
        except (OSError, ValueError, AttributeError):
            complete = False
        os.replace(staging if complete else old, out)
    shutil.rmtree(old, ignore_errors=True)


# --- the process: signals, exit codes, allocator, launcher ------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM handled as Ctrl-C, so the run saves what it can; exit 143 instead of 130."""
    exit_code = 143


def _raise_terminated(signum, frame):
    raise Terminated()


def keep_freed_memory():
    """On CPU, stop glibc from giving freed blocks back to the OS (blocks over its mmap threshold, and the top
    of the heap over its trim threshold): each step would otherwise page-fault its buffers in afresh. The same
    as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824, set from
    inside the script so that `python 01_base.py` gets it. `python -m common.bench` measures it (row
    train_step_allocator: fp32 step with glibc's defaults vs with this, 49.2 vs 58.7 images/s on a 2-core AMD
    EPYC). No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not libc.mallopt(m_mmap_threshold, 1 << 30):  # glibc builds that cap the threshold take their maximum
        libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


@contextlib.contextmanager
def process(main_rank=True):
    """A script's process: SIGTERM raised as Terminated (on rank 0; other ranks keep the default immediate
    exit), freed memory kept mapped, and every failure mapped to its exit code here, in one place:
    UserError and OSError 1 (one line), an exception with `exit_code` (divergence 3) that code, Ctrl-C 130,
    SIGTERM 143. Messages are printed by rank 0 only."""
    if main_rank:
        signal.signal(signal.SIGTERM, _raise_terminated)
    keep_freed_memory()
    try:
        yield
    except KeyboardInterrupt as e:
        sys.exit(getattr(e, "exit_code", 130))
    except UserError as e:
        code = getattr(e, "exit_code", 1)
        if main_rank and code != 1:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(f"error: {e}" if main_rank and code == 1 else code)  # sys.exit(str): the line on stderr, exit 1
    except OSError as e:  # disk full, permissions, a folder where a file should be: nothing to debug in our code
        where = f": {e.filename}" if e.filename else ""
        sys.exit(f"error: {e.strerror or type(e).__name__}{where}" if main_rank else 1)


def die_with_launcher():
    """Linux: the kernel kills this worker when torchrun dies. Otherwise a launcher killed with -9 leaves its
    workers running, finishing the run behind a later --resume's back."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGKILL)
