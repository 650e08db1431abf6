"""Test-time adaptation to an unlabelled target test set, a separate evaluation beside the source-only one.

bn    re-estimate every BatchNorm's statistics on the target images (AdaBN, Li et al. 2016), then test.
tent  Tent (Wang et al., ICLR 2021): one pass over the target stream in batches; each batch is predicted
      with BatchNorm in batch-statistics mode, then the BN affine parameters take one step that lowers the
      entropy of those predictions. Accuracy is that of the online predictions.
Both work on a copy: the model whose source-only accuracy is reported is never changed. Labels are only
used to score the predictions, never to adapt.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from .errors import UserError
from .train import autocast, evaluate, to_input

def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_batchnorm(model, x, precision, batch_size=512):
    """A copy of model whose BN statistics are those of the images x (AdaBN): torch's swa_utils.update_bn, a
    cumulative average over the stream in order."""
    model = copy.deepcopy(model)
    with autocast(x.device, precision):
        update_bn((to_input(xb) for xb in x.split(batch_size)), model)
    return model.eval()


def tent(model, x, precision, lr=1e-3, batch_size=128):
    """Online predictions of Tent over the stream x, in order."""
    model = copy.deepcopy(model).train()
    params = [p for bn in batchnorms(model) for p in (bn.weight, bn.bias) if p is not None]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    preds = []
    for xb in x.split(batch_size):
        with autocast(x.device, precision):
            logits = model(to_input(xb)).float()
        entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        entropy.backward()
        optimizer.step()
        preds.append(logits.argmax(1).detach())
    return torch.cat(preds)


def adapted_accuracy(model, x, y, method, precision, tent_lr=1e-3, tent_batch=128):
    """Accuracy on (x, y) after adapting a copy of model to x without its labels (Tent: --tent-lr, --tent-batch)."""
    if not batchnorms(model):
        raise UserError(f"--tta {method} adapts BatchNorm layers, and this model has none (--norm none)")
    if method == "bn":
        return evaluate(adapt_batchnorm(model, x, precision), x, y, precision)[1]
    return (tent(model, x, precision, tent_lr, tent_batch) == y).float().mean().item()
