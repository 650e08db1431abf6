"""fit(): the one training loop of every experiment, train_step() (what fit and the bench time), evaluate(); autocast
and the fp16 grad scaler, losses (JSD consistency), optimizers, the one-cycle schedule, weight averaging (--swa)."""
import copy
import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .augment import augment
from .config import DG_FIELDS
from .errors import UserError


def grad_scaler(device, precision):
    """fp16's narrow range underflows small gradients: scale the loss up, unscale before the step. A no-op
    unless fp16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast(device, precision):
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def to_input(images_uint8, augment_cfg=None, key=0, view=0):
    """uint8 batch -> float in [0, 1], augmented as augment_cfg says when one is given (random draws from
    `key` and `view`), then channels_last: faster convolutions on CUDA and on CPUs alike."""
    x = images_uint8.float() / 255 if augment_cfg is None else augment(images_uint8, augment_cfg, key, view)
    return x.contiguous(memory_format=torch.channels_last)


def augment_key(seed, epoch, step):
    """The augmentation draws of one batch: a function of (seed, epoch, step) alone, so a resumed run replays
    them, and computed on the host, so no device sync per step."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + step


def steps_per_epoch(n_images, batch_size):
    return n_images // min(batch_size, n_images)


def epoch_generator(seed, epoch, device):
    """Batch order of an epoch depends only on (seed, epoch): a resumed run replays it."""
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
    """SGD + Nesterov or AdamW. --no-decay-norm-bias: BatchNorm scales and shifts, biases and SkipInit gains (every
    parameter of at most one dimension) are not decayed, only the conv and linear weights."""
    params = model.parameters()
    if not cfg.decay_norm_bias:
        decayed = [p for p in model.parameters() if p.ndim > 1]
        params = [dict(params=decayed), dict(params=[p for p in model.parameters() if p.ndim <= 1], weight_decay=0.0)]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)


def one_cycle(step, total, warmup):
    """lr / peak at `step` of `total`: cosine ramp from 1/25 to 1 over the warm-up, cosine down to 1/250,000 at
    the last step (OneCycleLR's shape and defaults). Written out because OneCycleLR divides by zero when the
    warm-up rounds to one step (5 steps at warm-up 0.2); valid for any total >= 1."""
    start, end = 1 / 25, 1 / 25 / 1e4
    ramp = max(1, round(warmup * total))
    if step < ramp:
        return start + (1 - start) * (1 - math.cos(math.pi * step / ramp)) / 2
    fall = min(1.0, (step - ramp) / max(1, total - 1 - ramp))
    return end + (1 - end) * (1 + math.cos(math.pi * fall)) / 2


def make_schedule(cfg, optimizer, steps_per_epoch):
    total = cfg.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(one_cycle, total=total, warmup=cfg.warmup))


def progress_bar(iterable, desc, total=None):
    """A transient tqdm bar on rank 0's terminal (none in logs or pipes: tqdm's disable=None), for every phase
    that takes more than a few seconds; the permanent lines are printed apart."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None if distributed.is_main() else True)


@torch.inference_mode()
def evaluate(model, x, y, precision, batch_size=None, desc="evaluate"):
    """(mean cross-entropy without smoothing, accuracy as a fraction, predictions) over a whole split."""
    # CPUs run small batches faster (caches): 07's ResNet-18 in bf16 on a 2-core AMD EPYC took 3.1 ms/image at
    # 128 against 3.6-4.5 at 512 (one timing script, two repeats); a GPU wants the large batch.
    batch_size = batch_size or (512 if x.device.type == "cuda" else 128)
    model.eval()
    loss, preds = torch.zeros((), device=x.device), []
    for xb, yb in progress_bar(batches(x, y, batch_size), desc, total=-(-len(y) // batch_size)):
        with autocast(x.device, precision):
            logits = model(to_input(xb)).float()
        loss += F.cross_entropy(logits, yb, reduction="sum")
        preds.append(logits.argmax(1))
    preds = torch.cat(preds)
    return loss.item() / len(y), (preds == y).float().mean().item(), preds


def loss_function(cfg):
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def jensen_shannon(logits, fixed_first=False):
    """Generalized Jensen-Shannon divergence between the predictions of several views (V, B, classes) of one
    batch: the mean KL from each view's softmax to their mixture (AugMix, Hendrycks et al., ICLR 2020).
    Zero iff all views predict alike; at most ln V. fixed_first: the same value, no gradient through the first
    view's prediction, a target the others move to (UDA, Xie et al., NeurIPS 2020, holds its clean one fixed)."""
    log_p = F.log_softmax(logits.float(), -1)
    if fixed_first:
        log_p = torch.cat([log_p[:1].detach(), log_p[1:]])
    log_mixture = torch.logsumexp(log_p, 0) - math.log(len(log_p))
    return (log_p.exp() * (log_p - log_mixture)).sum(-1).mean()


def derived(cfg, **changes):
    """A per-step variant of cfg (a scheduled or a clean view's strengths), not a config of its own: it skips the
    cross-field checks, which judge what a user asks for, not a view of it."""
    view = copy.copy(cfg)
    for key, value in changes.items():
        object.__setattr__(view, key, value)
    return view


def clean_view(cfg):
    """The anchor view of --consistency-clean: the same geometry and colour, no cross-domain augmentation."""
    return derived(cfg, **{k: 0.0 for k in DG_FIELDS})


def training_loss(model, xb, yb, cfg, key, loss_fn, precision):
    """(loss, logits of the first view) of one batch. With --consistency: cfg.views augmented views in one
    forward pass, cross-entropy averaged over them plus the weighted Jensen-Shannon consistency; with
    --consistency-clean, view 0 is the clean view and the only one with cross-entropy (AugMix), unless
    --consistency-dg-ce adds the other views' mean cross-entropy to it. Augmentation runs outside autocast:
    in fp32 whatever the model's precision."""
    views = cfg.views if cfg.consistency else 1
    augment_cfg = cfg if cfg.augments else None
    inputs = torch.cat([to_input(xb, clean_view(cfg) if view == 0 and cfg.consistency_clean else augment_cfg, key, view)
                        for view in range(views)])
    with autocast(xb.device, precision):
        logits = model(inputs)
    logits = logits.float().view(views, len(xb), -1)
    if cfg.consistency_clean:
        loss = loss_fn(logits[0], yb)
        if cfg.consistency_dg_ce:
            loss = loss + loss_fn(logits[1:].flatten(0, 1), yb.repeat(views - 1))
    else:
        loss = loss_fn(logits.flatten(0, 1), yb.repeat(views))
    if views > 1:
        loss = loss + cfg.consistency * jensen_shannon(logits, fixed_first=cfg.consistency_fixed_clean)
    return loss, logits[0]


def scheduled(cfg, done):
    """cfg as it stands `done` (a fraction) into training: the cross-domain augmentations scaled up over the
    --dg-ramp (a network that has first learned the digits meets the strange textures gradually), and the
    consistency weight decayed by --consistency-decay (invariance learned early; the last steps fit the source)."""
    changes = {}
    if cfg.dg_ramp and done < cfg.dg_ramp:
        changes.update({k: getattr(cfg, k) * done / cfg.dg_ramp for k in DG_FIELDS})
    if cfg.consistency_decay:
        changes["consistency"] = cfg.consistency * (1 - cfg.consistency_decay * done)
    return derived(cfg, **changes) if changes else cfg


# Cross-entropy over 10 classes starts near ln 10 = 2.3; a train loss of 1,000 means logit margins of 1,000 the
# wrong way: blown up, even if finite (--lr 1e6 gave a train loss of 7e10 and a validation loss of 9e34, once
# recorded as finished). Validation gets a far higher bar: a healthy BN run's early validation loss reached 1,973
# on 554 SVHN images (running statistics of four steps) and recovered.
DIVERGED_LOSS, DIVERGED_VAL_LOSS = 1e3, 1e6


def diverged(loss):
    return not math.isfinite(loss) or loss > DIVERGED_LOSS


class Diverged(UserError):
    """The loss blew up: exit 3, status "diverged", the last good checkpoint kept."""
    exit_code = 3


def blown_up(epoch, step, loss, what="loss"):
    return Diverged(f"{what} became {loss:.4g} at epoch {epoch}{f', step {step}' if step else ''}: the run "
                    "diverged; try a lower --lr (or --norm batch)")


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
    averaged: dict = None                           # --swa: the running weight average (AveragedModel's state dict)

    def add_epoch(self, record, step_losses, model):
        self.history.append(record)
        self.steps.extend(step_losses)
        self.epoch = record["epoch"]
        if record["val_acc"] >= self.best_val_acc:  # a tie goes to the later, longer-trained epoch
            self.best_val_acc, self.best_epoch = record["val_acc"], record["epoch"]
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(model, optimizer, schedule, cfg, train, val, precision, progress, on_epoch_end=lambda progress: None,
        scaler=None):
    """Train from progress.epoch to cfg.epochs; after each epoch evaluate on validation, keep the best
    weights (model selection never looks at a test set) and call on_epoch_end (checkpointing). Under
    torchrun each rank trains on its slice of the same global batch (DDP averages the gradients); losses
    are averaged over ranks and rank 0's validation result is every rank's, so all choose the same epoch."""
    x = train[0]
    scaler = scaler or grad_scaler(x.device, precision)
    world = distributed.world_size()
    if min(cfg.batch_size, len(x)) % world:
        raise UserError(f"--batch-size {min(cfg.batch_size, len(x))} (the global batch) must be divisible by the {world} "
                        "processes")
    step_model = distributed.wrap(model, x.device, cfg.sync_bn)
    step_model = torch.compile(step_model) if cfg.compile else step_model
    averager = weight_average(model, progress) if cfg.swa else None
    for epoch in range(progress.epoch, cfg.epochs):
        start = time.perf_counter()
        step_losses, train_acc = train_epoch(step_model, optimizer, schedule, scaler, cfg, train, epoch, precision,
                                             None if averager is None else lambda: averager.update_parameters(model))
        # Once averaging has begun, the average is the model: validation scores it and the best epoch keeps it.
        scored = averager.module if averager is not None and averager.n_averaged > 0 else model
        val_loss, val_acc = distributed.from_main(evaluate(scored, *val, precision, desc="validation")[:2]
                                                  if distributed.is_main() else None)
        if not math.isfinite(val_loss) or val_loss > DIVERGED_VAL_LOSS:
            raise blown_up(epoch + 1, None, val_loss, "validation loss")
        record = dict(epoch=epoch + 1, train_loss=sum(step_losses) / len(step_losses), train_acc=train_acc,
                      val_loss=val_loss, val_acc=val_acc, lr=schedule.get_last_lr()[0],
                      seconds=time.perf_counter() - start)
        progress.add_epoch(record, step_losses, scored)
        if averager is not None:
            progress.averaged = {k: v.detach().to("cpu", copy=True) for k, v in averager.state_dict().items()}
        if distributed.is_main():
            print(f"epoch {epoch + 1:>{len(str(cfg.epochs))}}/{cfg.epochs} | train {record['train_loss']:.3f} "
                  f"{100 * train_acc:.1f}% | val {val_loss:.3f} {100 * val_acc:.1f}% | "
                  f"lr {record['lr']:.3g} | {record['seconds']:.0f}s", flush=True)
        on_epoch_end(progress)
    return progress


def weight_average(model, progress):
    """--swa: torch's AveragedModel (an equal-weight running mean of the weights, BatchNorm statistics averaged
    with them, so no extra pass over the data), continued from the checkpoint's average on --resume."""
    averager = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    if progress.averaged is not None:
        averager.load_state_dict(progress.averaged)
    return averager


def train_step(model, optimizer, scaler, cfg, xb, yb, key, loss_fn, precision):
    """One optimizer step on a uint8 batch (augmented views, the loss, backward, clipping, the update): what
    every run's training is made of, and what `python -m common.bench` times. Returns (loss, first view's logits),
    on the device: reading them is the caller's sync."""
    loss, logits = training_loss(model, xb, yb, cfg, key, loss_fn, precision)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_grad:  # on the true gradients: unscaled first (a no-op unless fp16)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def train_epoch(model, optimizer, schedule, scaler, cfg, train, epoch, precision, average=None):
    """One seeded pass over the training images: (loss of every step, averaged over ranks; train accuracy).
    With `average` (--swa), every step in the last cfg.swa of training calls it: the weights join the average."""
    x, y = train
    world, rank = distributed.world_size(), distributed.rank()
    steps = steps_per_epoch(len(x), cfg.batch_size)
    loss_fn = loss_function(cfg)
    model.train()
    losses, correct = [], torch.zeros((), device=x.device, dtype=torch.long)
    bar = progress_bar(batches(x, y, cfg.batch_size, epoch_generator(cfg.seed, epoch, x.device)), f"epoch {epoch + 1}",
                       total=steps)
    for step, (xb, yb) in enumerate(bar):
        if world > 1:  # this rank's slice of the global batch
            xb, yb = xb.chunk(world)[rank], yb.chunk(world)[rank]
        key = augment_key(cfg.seed, epoch, step) * world + rank
        step_cfg = scheduled(cfg, (epoch * steps + step) / (cfg.epochs * steps))
        loss, logits = train_step(model, optimizer, scaler, step_cfg, xb, yb, key, loss_fn, precision)
        schedule.step()
        if average and epoch * steps + step + 1 > (1 - cfg.swa) * cfg.epochs * steps:
            average()
        losses.append(loss.detach())
        correct += (logits.argmax(1) == yb).sum()
        # Reading the loss forces a device sync: every 10 steps, not every step. Averaged over ranks, so a NaN
        # on one rank stops all of them at the same step.
        if step % 10 == 0 or step == steps - 1:
            value = distributed.mean(loss.detach()).item()
            if diverged(value):
                raise blown_up(epoch + 1, step + 1, value)
            bar.set_postfix(loss=f"{value:.3f}")
    step_losses = distributed.mean(torch.stack(losses).float()).tolist()
    bad = [i for i, v in enumerate(step_losses) if diverged(v)]
    if bad:
        raise blown_up(epoch + 1, bad[0] + 1, step_losses[bad[0]])
    return step_losses, distributed.total(correct).item() / (len(step_losses) * min(cfg.batch_size, len(x)))
