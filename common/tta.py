"""Test-time adaptation to an unlabelled target set, a separate evaluation beside the source-only one.

bn    re-estimate every BatchNorm's statistics on the target images (AdaBN, Li et al. 2016), then test.
tent  Tent (Wang et al., ICLR 2021): one pass over the target stream in batches; each batch is predicted
      with BatchNorm in batch-statistics mode, then the BN affine parameters take one step that lowers the
      entropy of those predictions. Accuracy is that of the online predictions.
shot  SHOT-IM (Liang et al., ICML 2020), on the BN affine parameters: the target's BN statistics first (as bn),
      then one pass in batches, each step lowering the mean entropy of the predictions while raising the
      entropy of their batch mean (diversity), which Tent lacks: predicting one class for everything costs
      ln 10. Then every image is predicted by the adapted model.
t3a   T3A (Iwasawa & Matsuo, NeurIPS 2021): no gradient. The classifier's weight rows start as the class
      prototypes; each target batch's features join the supports of their predicted class, each class keeps
      its t3a_filter lowest-entropy supports, and a batch is predicted by its nearest (cosine) prototypes.
Each works on a copy: the model whose source-only accuracy is reported is never changed. Labels are only
used to score the predictions, never to adapt.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from .errors import UserError
from .training import autocast, evaluate, progress_bar, to_input


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_batchnorm(model, x, precision, batch_size=512):
    """A copy of model whose BN statistics are those of the images x (AdaBN): torch's swa_utils.update_bn, a
    cumulative average over the stream in order."""
    model = copy.deepcopy(model)
    with autocast(x.device, precision):
        update_bn((to_input(xb) for xb in progress_bar(x.split(batch_size), "BN statistics")), model)
    return model.eval()


def affine_optimizer(model, lr):
    """SGD (momentum 0.9) on the BN scales and shifts of `model`, every other parameter frozen."""
    params = [p for bn in batchnorms(model) for p in (bn.weight, bn.bias) if p is not None]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def entropy(logits):
    return -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1)


def tent(model, x, precision, lr=1e-3, batch_size=128):
    """(online predictions of Tent over the stream x, in order; the adapted copy after the last step)."""
    model = copy.deepcopy(model).train()
    optimizer = affine_optimizer(model, lr)
    preds = []
    for xb in progress_bar(x.split(batch_size), "tent"):
        with autocast(x.device, precision):
            logits = model(to_input(xb)).float()
        optimizer.zero_grad(set_to_none=True)
        entropy(logits).mean().backward()
        optimizer.step()
        preds.append(logits.argmax(1).detach())
    return torch.cat(preds), model


def information_maximization(logits):
    """SHOT's IM loss: mean entropy of the predictions minus the entropy of their mean (diversity)."""
    mean = F.softmax(logits, 1).mean(0)
    return entropy(logits).mean() + (mean * torch.log(mean + 1e-5)).sum()


def shot(model, x, precision, lr=1e-3, batch_size=128):
    """A copy of model adapted by SHOT-IM: the target's BN statistics, then one pass of IM steps on the BN
    affine parameters with those statistics fixed (eval mode)."""
    model = adapt_batchnorm(model, x, precision)
    optimizer = affine_optimizer(model, lr)
    for xb in progress_bar(x.split(batch_size), "shot"):
        with autocast(x.device, precision):
            logits = model(to_input(xb)).float()
        optimizer.zero_grad(set_to_none=True)
        information_maximization(logits).backward()
        optimizer.step()
    return model.eval()


@torch.inference_mode()
def t3a(model, x, precision, filter_k=100, batch_size=128):
    """Online predictions of T3A over the stream x, in order."""
    model = copy.deepcopy(model).eval()
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    features = []
    hook = fc.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].float()))
    supports = F.normalize(fc.weight.float(), dim=1)  # the classifier's rows are the first supports (the paper)
    labels = torch.arange(len(supports), device=x.device)
    scores = entropy(supports @ fc.weight.float().T + fc.bias.float())
    preds = []
    for xb in progress_bar(x.split(batch_size), "t3a"):
        with autocast(x.device, precision):
            model(to_input(xb))
        raw = features.pop()
        z, logits = F.normalize(raw, dim=1), F.linear(raw, fc.weight.float(), fc.bias.float())
        supports, labels = torch.cat([supports, z]), torch.cat([labels, logits.argmax(1)])
        scores = torch.cat([scores, entropy(logits)])
        keep = torch.cat([torch.nonzero(labels == c)[:, 0][scores[labels == c].argsort()[:filter_k]]
                          for c in range(fc.out_features)])
        supports, labels, scores = supports[keep], labels[keep], scores[keep]
        prototypes = F.normalize(F.one_hot(labels, fc.out_features).float().T @ supports, dim=1)
        preds.append((z @ prototypes.T).argmax(1))
    hook.remove()
    return torch.cat(preds)


def adapted_accuracy(model, x, y, method, precision, cfg):
    """Accuracy on (x, y) after adapting a copy of model to x without its labels (cfg: --tent-lr, --tent-batch,
    --shot-lr, --t3a-filter)."""
    if method != "t3a" and not batchnorms(model):
        raise UserError(f"--tta {method} adapts BatchNorm layers, and this model has none (--norm none)")
    if method == "bn":
        return evaluate(adapt_batchnorm(model, x, precision), x, y, precision, desc="bn: test")[1]
    if method == "shot":
        return evaluate(shot(model, x, precision, cfg.shot_lr, cfg.tent_batch), x, y, precision, desc="shot: test")[1]
    if method == "t3a":
        preds = t3a(model, x, precision, cfg.t3a_filter)
    else:
        preds = tent(model, x, precision, cfg.tent_lr, cfg.tent_batch)[0]
    return (preds == y).float().mean().item()
