"""python -m common.report [--results-dir R]: write R/summary.md from every finished R/<exp>/seed-*/metrics.json.

One row per experiment: test accuracies as mean ± std over seeds (percent), the writeup's numbers beside
them, and where each number came from. Smoke (--quick) runs get their own table, never mixed with results.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from .config import Parser
from .results import finished_files, read_metrics, write_text

# The writeup's test accuracies (%) in ../shared/seeds/: (SVHN, MNIST); None where it gives none.
WRITEUP = {
    "01_base": (90.31, 62.89),
    "02_no_bn": (84.00, 56.11),
    "03_label_smoothing": (91.30, 63.53),
    "04_augmentation": (93.83, 68.01),
    "05_transfer": (92.09, 69.00),
    "06_adam": (91.74, 75.99),
    "07_reverse_mnist": (27.95, 99.01),
    "08_finetune_svhn": (31.89, None),
}
# Published cross-domain numbers (%), each with its protocol, shown beside ours. Not comparable one to one: the
# papers train small ConvNets and test on the full test sets; our rows say what they trained and tested on.
PUBLISHED = {
    "MNIST -> SVHN": "single-source DG, the first 10,000 MNIST training images at 32x32, full SVHN test (26,032), "
                     "small ConvNets: ERM 27.8, M-ADA 42.6, RandConv 57.6 (Xu et al. 2021), PDEN 62.2, AugMix+JSD 63.9, "
                     "SADA 68.5, Pro-RandConv 69.7 (Choi et al. 2023), AdvFrequency 73.6 (2024); the writeup's 07: 27.95",
    "SVHN -> MNIST": "trained on all of SVHN train (73,257), full MNIST test: source-only 54.9-74.1 in the literature; "
                     "with Tent on the unlabelled MNIST test set 87.5 (online) and 91.8 (offline) (Wang et al. 2021); "
                     "the writeup's 01-06: 62.89-75.99",
}
HEADER = ("| experiment | SVHN test % | MNIST test % | writeup SVHN | writeup MNIST | seeds | epochs | "
          "train images | wall time / seed | device | plots |\n|---|---|---|---|---|---|---|---|---|---|---|")


def mean_std(values):
    values = 100 * np.asarray(values)
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def duration(seconds):
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f}min" if seconds < 5400 else f"{seconds / 3600:.1f}h"


def joined(values):
    return ", ".join(str(v) for v in sorted(set(values), key=str))


def row(name, runs, link_root):
    writeup = ["—" if v is None else f"{v:.2f}" for v in WRITEUP.get(name, (None, None))]
    configs = [m["config"] for m in runs]
    images = joined(f"subset {c['train_subset']}" if c["train_subset"] else "all" for c in configs)
    images += f" ({joined(m['data']['train'] for m in runs)})"
    cross = "mnist" if configs[0]["dataset"] == "svhn" else "svhn"
    seed_dir = f"{link_root}{name}/seed-{configs[0]['seed']}"
    plots = f"[loss]({seed_dir}/loss.png) [acc]({seed_dir}/accuracy.png) [{cross}]({seed_dir}/confusion_{cross}.png)"
    return (f"| {name} | {mean_std([m['test']['svhn'] for m in runs])} | {mean_std([m['test']['mnist'] for m in runs])} "
            f"| {writeup[0]} | {writeup[1]} | {len(runs)} | {joined(c['epochs'] for c in configs)} | {images} "
            f"| {duration(np.mean([m['wall_time_s'] for m in runs]))} "
            f"| {joined(m['device_name'] + ' (' + m['precision'] + ')' for m in runs)} | {plots} |")


def cross_domain(full):
    """Both directions: the other domain's test accuracy, source-only and after each test-time adaptation
    (mean ± std over the seeds that ran it), the target dev accuracy that recipes were chosen on, and the
    published numbers with their protocols."""
    lines = ["", "## Cross-domain (tested on the domain it never trained on)", "",
             "| direction | experiment | train images | source-only % | after --tta bn % | after --tta tent % | "
             "target dev % (cross-domain train file) | seeds |", "|---|---|---|---|---|---|---|---|"]
    directions = set()
    for name in sorted(full):
        runs = full[name]
        source = runs[0]["config"]["dataset"]
        target = "mnist" if source == "svhn" else "svhn"
        direction = f"{source.upper()} -> {target.upper()}"
        directions.add(direction)
        adapted = [mean_std(accuracy) if accuracy else "—" for accuracy in
                   ([m["test_tta"][method][target] for m in runs if method in m.get("test_tta", {})]
                    for method in ("bn", "tent"))]
        dev = [m["dev"][target] for m in runs if target in m.get("dev", {})]
        lines.append(f"| {direction} | {name} | {joined(m['data']['train'] for m in runs)} | "
                     f"{mean_std([m['test'][target] for m in runs])} | {adapted[0]} | {adapted[1]} | "
                     f"{mean_std(dev) if dev else '—'} | {len(runs)} |")
    lines += ["", "Published, with their protocols:"] + [f"- {d}: {PUBLISHED[d]}" for d in PUBLISHED if d in directions]
    return lines


def collect(root):
    """{experiment: [finished metrics]} under root, and the files skipped with why."""
    found, skipped = {}, []
    for path in finished_files(root, "*"):
        metrics, problem = read_metrics(path)
        if metrics is None:
            skipped.append(f"{path}: {problem}")
        elif metrics.get("status") == "finished":
            found.setdefault(path.parent.parent.name, []).append(metrics)
    return found, skipped


def summary(results_dir):
    root = Path(results_dir)
    full, skipped = collect(root)
    quick, skipped_quick = collect(root / "quick")
    lines = ["# Results", "",
             f"Generated by `python -m common.report` from `{root}/*/seed-*/metrics.json`. Test accuracy (%) of the",
             "epoch chosen on validation, mean ± std over seeds (one seed: the value). `subset N` rows trained on",
             "N images only: they are not comparable with the writeup's full-SVHN numbers.", ""]
    lines += [HEADER] + [row(name, full[name], "") for name in sorted(full)] if full else ["No finished runs yet."]
    if quick:
        lines += ["", "## Smoke runs (--quick: 256 images, 1 epoch; they test the code, not the method)", "", HEADER]
        lines += [row(name, quick[name], "quick/") for name in sorted(quick)]
    adapted = [(name, m) for name in sorted(full) for m in full[name] if m.get("test_tta")]
    if adapted:
        lines += ["", "## Test-time adaptation (a separate evaluation: the tables above are source-only)", "",
                  "| experiment | seed | method | target test set | source-only % | after adaptation % |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {m['config']['seed']} | {method} | {target.upper()} | "
                  f"{100 * m['test'][target]:.2f} | {100 * accuracy:.2f} |"
                  for name, m in adapted for method, by_target in m["test_tta"].items()
                  for target, accuracy in sorted(by_target.items())]
    if full:
        lines += cross_domain(full)
    missing = [name for name in WRITEUP if name not in full]
    if missing:
        lines += ["", f"No results yet{' (smoke runs aside)' if quick else ''}: {', '.join(missing)}."]
    if skipped + skipped_quick:
        lines += ["", "Skipped files:"] + [f"- {s}" for s in skipped + skipped_quick]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default="results", help="where the runs are (default: results)")
    args = parser.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        sys.exit(f"error: --results-dir {args.results_dir} is not a folder")
    text = summary(args.results_dir)
    out = Path(args.results_dir) / "summary.md"
    try:
        write_text(out, text)
    except OSError as e:
        sys.exit(f"error: cannot write {out} ({e.strerror or type(e).__name__})")
    print(text + f"\nwrote {out}")


if __name__ == "__main__":
    main()
