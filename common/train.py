"""fit(): the one training loop of every experiment; evaluate(); devices, precision, optimizers, schedules."""
import ctypes
import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .augment import augment
from .config import UserError


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def bf16_native(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_precision(amp, device):
    """bf16 autocast where the hardware runs bf16 natively: with channels_last, 1.9x the train-step throughput
    of fp32 NCHW on this machine's AVX512-BF16 CPU (220 vs 114 images/s, row train_step_precision of
    `python -m common.bench`)."""
    if amp == "bf16" and not bf16_native(device):
        raise UserError(f"--amp bf16: {device.type} here has no native bf16; use --amp off")
    if amp == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return "bf16" if amp == "bf16" else "fp32"


@functools.cache
def keep_freed_memory(device):
    """On CPU, stop glibc from giving freed blocks back to the OS (blocks over its mmap threshold, and the top
    of the heap over its trim threshold): each step would otherwise page-fault its buffers in afresh. Measured
    here: 7,175 -> 200 minor page faults per 512-image augmentation, 11.3 -> 3.4 ms; fp32 train step 88 -> 114
    images/s (`python -m common.bench`). Freed memory is still reused: peak RSS of that check 1,470 -> 1,515 MiB.
    fit() calls it after the data is loaded, so the loaders' temporaries still go back to the OS. No-op off
    glibc and on CUDA (whose allocator caches already)."""
    if device.type != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not libc.mallopt(m_mmap_threshold, 1 << 30):  # glibc builds that cap the threshold take their maximum
        libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def to_input(images_uint8, augment_cfg=None, generator=None):
    """uint8 batch -> float in [0, 1], augmented as augment_cfg says when one is given, then channels_last:
    faster convolutions on CUDA and on this CPU alike (fp32 train step 90 vs 70 images/s here)."""
    x = images_uint8.float() / 255 if augment_cfg is None else augment(images_uint8, augment_cfg, generator)
    return x.contiguous(memory_format=torch.channels_last)


def steps_per_epoch(n_images, batch_size):
    return n_images // min(batch_size, n_images)


def epoch_generator(seed, epoch, device):
    """Batch order and augmentation of an epoch depend only on (seed, epoch): a resumed run replays them."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def batches(x, y, batch_size, generator=None):
    """Index slices of data already on the device. With a generator: shuffled, last partial batch dropped
    (a batch of one breaks BatchNorm; the next epoch's permutation covers the dropped images)."""
    n = len(x)
    if generator is None:
        order, stop = torch.arange(n, device=x.device), n
    else:
        batch_size = min(batch_size, n)
        order, stop = torch.randperm(n, generator=generator, device=x.device), n - n % batch_size
    for i in range(0, stop, batch_size):
        idx = order[i: i + batch_size]
        yield x[idx], y[idx]


def make_optimizer(cfg, model):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay)


def make_schedule(cfg, optimizer, steps_per_epoch):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                               pct_start=cfg.warmup, cycle_momentum=False)


@torch.inference_mode()
def evaluate(model, x, y, precision, batch_size=512):
    """(mean cross-entropy without smoothing, accuracy as a fraction, predictions) over a whole split."""
    model.eval()
    loss, preds = torch.zeros((), device=x.device), []
    for xb, yb in batches(x, y, batch_size):
        with autocast(x.device, precision):
            logits = model(to_input(xb)).float()
        loss += F.cross_entropy(logits, yb, reduction="sum")
        preds.append(logits.argmax(1))
    preds = torch.cat(preds)
    return loss.item() / len(y), (preds == y).float().mean().item(), preds


def loss_function(cfg):
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


class Diverged(Exception):
    def __init__(self, epoch, step, loss):
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}: the run diverged; "
                         "try a lower --lr (or --norm batch)")


@dataclass
class Progress:
    """Everything fit() accumulates; saved in each checkpoint so that a resumed run continues it."""
    epoch: int = 0                                  # epochs completed
    history: list = field(default_factory=list)     # one record per epoch
    steps: list = field(default_factory=list)       # train loss of every step
    best_val_acc: float = -1.0
    best_epoch: int = 0
    best_weights: dict = None                       # state dict of the epoch with the best validation accuracy
    elapsed: float = 0.0                            # wall seconds so far, across resumes


def fit(model, optimizer, schedule, cfg, train, val, precision, progress, on_epoch_end=lambda progress: None):
    """Train from progress.epoch to cfg.epochs; after each epoch evaluate on validation, keep the best
    weights (model selection never looks at a test set) and call on_epoch_end (checkpointing)."""
    x, y = train
    keep_freed_memory(x.device)
    loss_fn = loss_function(cfg)
    step_model = torch.compile(model) if cfg.compile else model
    steps = steps_per_epoch(len(x), cfg.batch_size)
    for epoch in range(progress.epoch, cfg.epochs):
        start = time.perf_counter()
        model.train()
        generator = epoch_generator(cfg.seed, epoch, x.device)
        losses, correct = [], torch.zeros((), device=x.device, dtype=torch.long)
        bar = tqdm(batches(x, y, cfg.batch_size, generator), total=steps, leave=False,
                   desc=f"epoch {epoch + 1}", disable=None)
        for step, (xb, yb) in enumerate(bar):
            inputs = to_input(xb, cfg if cfg.augments else None, generator)
            with autocast(x.device, precision):
                logits = step_model(inputs)
            loss = loss_fn(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
            correct += (logits.argmax(1) == yb).sum()
            # Reading the loss forces a device sync: do it every 10 steps, not every step.
            if step % 10 == 0 or step == steps - 1:
                value = loss.item()
                if not math.isfinite(value):
                    raise Diverged(epoch + 1, step + 1, value)
                bar.set_postfix(loss=f"{value:.3f}")
        step_losses = torch.stack(losses).float().tolist()
        bad = [i for i, v in enumerate(step_losses) if not math.isfinite(v)]
        if bad:
            raise Diverged(epoch + 1, bad[0] + 1, step_losses[bad[0]])
        val_loss, val_acc, _ = evaluate(model, *val, precision)
        record = dict(epoch=epoch + 1, train_loss=sum(step_losses) / len(step_losses),
                      train_acc=correct.item() / (len(step_losses) * min(cfg.batch_size, len(x))),
                      val_loss=val_loss, val_acc=val_acc, lr=schedule.get_last_lr()[0],
                      seconds=time.perf_counter() - start)
        progress.history.append(record)
        progress.steps.extend(step_losses)
        progress.epoch = epoch + 1
        if val_acc >= progress.best_val_acc:  # a tie goes to the later, longer-trained epoch
            progress.best_val_acc, progress.best_epoch = val_acc, epoch + 1
            progress.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        print(f"epoch {epoch + 1:>{len(str(cfg.epochs))}}/{cfg.epochs} | train {record['train_loss']:.3f} "
              f"{100 * record['train_acc']:.1f}% | val {val_loss:.3f} {100 * val_acc:.1f}% | "
              f"lr {record['lr']:.3g} | {record['seconds']:.0f}s", flush=True)
        on_epoch_end(progress)
    return progress
