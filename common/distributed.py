"""One run on several processes under torchrun: set-up from its environment, who writes, reductions.

Launched without torchrun (no WORLD_SIZE), every function here is the single-process identity, so the
default path is unchanged. Under `torchrun --nproc-per-node N`, each process (rank) trains a
DistributedDataParallel replica on its slice of every global batch; rank 0 alone writes files.
"""
import os

import torch
import torch.distributed as dist

from .errors import UserError
from .plumbing import die_with_launcher


def launched():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def stray_environment():
    """A message when RANK or WORLD_SIZE is set but no launcher set the rest (MASTER_ADDR): a Slurm step or a
    notebook that inherited them would otherwise train silently as a non-writing rank, or hang. None if fine."""
    present = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ]
    if present and "MASTER_ADDR" not in os.environ:
        return (f"{', '.join(f'{k}={os.environ[k]}' for k in present)} set, but this process was not started by "
                "torchrun (no MASTER_ADDR): unset them, or launch with torchrun")
    return None


def check_same_config(config):
    """Every rank must run the same config (flags typed once per node can differ): the differing fields, named,
    are refused on every rank."""
    if not dist.is_initialized():
        return
    reference = from_main(config)
    differs = sorted(k for k in config if config[k] != reference.get(k))
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, differs)
    differs = sorted({k for ks in everyone for k in ks})
    if differs:
        raise UserError(f"the {world_size()} processes were launched with different flags: "
                        f"{', '.join('--' + k.replace('_', '-') for k in differs)}; launch every node with the same ones")


def setup(device):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not launched():
        return device
    die_with_launcher()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    """This process's rank; torchrun's RANK before the group is joined."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def mean(tensor):
    """The mean of a tensor over ranks (the tensor itself in one process)."""
    if not dist.is_initialized():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / world_size()


def total(tensor):
    if not dist.is_initialized():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def on_main(fn):
    """fn() on rank 0 alone (what only rank 0 does: locks, files); its UserError is raised on every rank,
    not left for the others to wait on in a collective."""
    if not dist.is_initialized():
        return fn()
    error = None
    if is_main():
        try:
            fn()
        except UserError as e:
            error = str(e)
    error = from_main(error)
    if error is not None:
        raise UserError(error)


def from_main(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def backend():
    return dist.get_backend() if dist.is_initialized() else None


def synchronized_bn(device, cfg):
    return dist.is_initialized() and cfg.sync_bn and device.type == "cuda" and cfg.norm == "batch"


def wrap(model, device, sync_bn):
    """DDP around the model; on CUDA, BatchNorm statistics synchronized across ranks when sync_bn (torch's
    SyncBatchNorm refuses CPU tensors, so on gloo each rank keeps its own)."""
    if not dist.is_initialized():
        return model
    if sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
