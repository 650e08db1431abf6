"""The project's figures, drawn with matplotlib's Figure API (no pyplot: no backend chosen, none changed) and
written atomically: a run's loss and accuracy curves, confusion matrices, augmented samples, 08's sweep, the
report's summary.png."""
import numpy as np
from matplotlib.figure import Figure

from .data import DOMAINS, TITLES
from .plumbing import atomic
from .results import accuracies


def figure(width, height):
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save_figure(fig, path):
    atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_curves(progress, name, out):
    steps_per_epoch = len(progress.steps) / max(1, len(progress.history))
    epochs_at = [h["epoch"] * steps_per_epoch for h in progress.history]
    fig, ax = figure(7, 4)
    ax.plot(range(1, len(progress.steps) + 1), progress.steps, lw=0.6, alpha=0.7, label="train (per step)")
    ax.plot(epochs_at, [h["val_loss"] for h in progress.history], "o-", label="validation (per epoch)")
    ax.set(xlabel="step", ylabel="cross-entropy", title=f"{name}: loss")
    ax.legend()
    save_figure(fig, out / "loss.png")

    fig, ax = figure(7, 4)
    epochs = [h["epoch"] for h in progress.history]
    ax.plot(epochs, [100 * h["train_acc"] for h in progress.history], "o-", label="train")
    ax.plot(epochs, [100 * h["val_acc"] for h in progress.history], "o-", label="validation")
    ax.axvline(progress.best_epoch, color="grey", ls=":", label=f"chosen epoch ({progress.best_epoch})")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{name}: accuracy")
    ax.legend()
    save_figure(fig, out / "accuracy.png")


def plot_confusion(matrix, title, path):
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    fig, ax = figure(5.5, 5)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true digit", title=title)
    save_figure(fig, path)


def plot_augmented(originals, versions, path):
    """A grid: each row an original training image, then augmented draws of it (what the model sees)."""
    columns = [originals] + list(versions)
    fig = Figure(figsize=(1.2 * len(columns), 1.2 * len(originals)))
    axes = fig.subplots(len(originals), len(columns), squeeze=False)
    for i in range(len(originals)):
        for j, images in enumerate(columns):
            axes[i, j].imshow(images[i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())  # amplitude may overshoot
            axes[i, j].axis("off")
    axes[0, 0].set_title("original", fontsize=8)
    for j in range(1, len(columns)):
        axes[0, j].set_title(f"draw {j}", fontsize=8)
    save_figure(fig, path)


COLOURS = dict(svhn="tab:blue", mnist="tab:orange", mnistm="tab:green", usps="tab:red")


TTA_MARKERS = dict(bn="s", tent="^", shot="v", t3a="P")


def plot_summary(full, writeup, papers, path):
    """summary.png: every experiment's test accuracy on each domain, a dot per seed, the writeup's numbers as
    black crosses; below, each target domain source-only (filled) beside after test-time adaptation (hollow),
    then `papers` (rows of results/published.csv) as diamonds. `writeup`: {experiment: (SVHN, MNIST)}."""
    names = list(full)
    fig = Figure(figsize=(max(7.0, 1.1 * (len(names) + len(papers)) + 2), 8.5))
    top, bottom = fig.subplots(2, 1)
    offsets = dict(zip(DOMAINS, (-0.24, -0.08, 0.08, 0.24)))
    for i, name in enumerate(names):
        for m in full[name]:
            for domain, value in accuracies(m["test"]).items():
                top.plot(i + offsets[domain], 100 * value, "o", color=COLOURS[domain], alpha=0.8, ms=5)
        for domain, value in zip(("svhn", "mnist"), writeup.get(name.split(" (")[0], (None, None))):
            if value is not None:
                top.plot(i + offsets[domain], value, "x", color="black", ms=8, mew=2)
        for m in full[name]:
            by_method = m.get("test_tta") if isinstance(m.get("test_tta"), dict) else {}
            for domain, value in accuracies(m["test"]).items():
                if domain == m["config"]["dataset"]:
                    continue
                bottom.plot(i + offsets[domain], 100 * value, "o", color=COLOURS[domain], ms=5)
                for method, marker in TTA_MARKERS.items():
                    adapted = accuracies(by_method.get(method)).get(domain)
                    if adapted is not None:
                        bottom.plot(i + offsets[domain], 100 * adapted, marker, mfc="none", color=COLOURS[domain], ms=7)
    for j, paper in enumerate(papers):
        for domain in DOMAINS:
            if paper[domain] is not None and not paper["direction"].startswith(domain.upper()):
                bottom.plot(len(names) + j + offsets[domain], paper[domain], "D", mfc="none", color=COLOURS[domain], ms=6)
    handles = [top.plot([], [], "o", color=c, label=TITLES[d])[0] for d, c in COLOURS.items()]
    handles.append(top.plot([], [], "x", color="black", mew=2, label="writeup")[0])
    top.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    top.set(ylabel="test accuracy (%)", title="test accuracy per experiment (a dot per seed)", ylim=(0, 100))
    extra = [bottom.plot([], [], "o", color="grey", label="source-only")[0]]
    extra += [bottom.plot([], [], marker, mfc="none", color="grey", label=f"after --tta {method}")[0]
              for method, marker in TTA_MARKERS.items()]
    if papers:
        extra.append(bottom.plot([], [], "D", mfc="none", color="grey", label="published (its own protocol)")[0])
    bottom.legend(handles=extra, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    bottom.set(ylabel="test accuracy (%)", title="cross-domain: the domains each model never trained on", ylim=(0, 100))
    labels = [n.replace(" (", "\n(") for n in names]
    for ax, ticks in ((top, labels), (bottom, labels + [f"{p['method']} ({p['year']})" for p in papers])):
        ax.set_xlim(-0.6, len(ticks) - 0.4)
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_sweep(rows, dataset, init_from, path):
    """08 --sweep's label_efficiency.png: test accuracy against labelled images, per arm."""
    fig, ax = figure(6, 4)
    for start in ("fine-tuned", "scratch"):
        points = [(r["labels"], 100 * r["test"][dataset]) for r in rows if r["start"] == start]
        ax.plot(*zip(*points), "o-", label=start + (f" from {init_from}" if start == "fine-tuned" else ""))
    ax.set(xscale="log", xlabel="labelled images (train + validation)", ylabel=f"{dataset.upper()} test accuracy (%)",
           title="label efficiency")
    ax.legend()
    save_figure(fig, path)
