"""python -m common.report [--results-dir R]: write R/summary.md from every finished R/<exp>/seed-*/metrics.json.

One row per experiment: test accuracies as mean ± std over seeds (percent), the writeup's numbers beside
them, and where each number came from. Smoke (--quick) runs get their own table, never mixed with results.
"""
import argparse
import csv
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from .config import Config, Parser
from .data import DOMAINS, TITLES
from .plots import plot_summary
from .plumbing import write_text
from .errors import UserError
from .plumbing import readable_file
from .results import MAX_METRICS_BYTES, PROFILE_FIELDS, accuracies, finished_files, number, read_metrics

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
# Published numbers beside ours, one row per method with its paper, backbone, budget, protocol and where the
# numbers were read: a data file, cited row by row, not typed here.
PUBLISHED_FILE = Path(__file__).resolve().parents[1] / "results" / "published.csv"


def published(path=PUBLISHED_FILE):
    """The rows of results/published.csv, accuracies (%) as floats (None where a paper gives none)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    return [{**r, **{d: float(r[d]) if r.get(d) else None for d in (*DOMAINS, "syn")}} for r in rows]


def direction(dataset):
    return f"{dataset.upper()}->"


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
    base = name.split(" (")[0]  # "07_reverse_mnist (mnist, subset 10000, 5 epochs)" when profiles differ
    writeup = ["—" if v is None else f"{v:.2f}" for v in WRITEUP.get(base, (None, None))]
    configs = [m["config"] for m in runs]
    images = joined(f"subset {c['train_subset']}" if c["train_subset"] else "all" for c in configs)
    images += f" ({joined(m['data'].get('train') for m in runs)})"
    cross = "mnist" if configs[0]["dataset"] == "svhn" else "svhn"
    seed_dir = f"{link_root}{base}/seed-{configs[0]['seed']}"
    plots = (f"[loss]({seed_dir}/loss.png) [acc]({seed_dir}/accuracy.png) [{cross}]({seed_dir}/confusion_{cross}.png)"
             if link_root is not None else "in each run's folder")
    return (f"| {name} | {mean_std([m['test']['svhn'] for m in runs])} | {mean_std([m['test']['mnist'] for m in runs])} "
            f"| {writeup[0]} | {writeup[1]} | {len(runs)} | {joined(c['epochs'] for c in configs)} | {images} "
            f"| {duration(np.mean([m['wall_time_s'] for m in runs]))} "
            f"| {joined(m['device_name'] + ' (' + m['precision'] + ')' for m in runs)} | {plots} |")


def unseen_mean(metrics):
    source = metrics["config"]["dataset"]
    unseen = [v for d, v in accuracies(metrics["test"]).items() if d != source]
    return sum(unseen) / len(unseen) if unseen else None


def table_header(columns):
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def cross_domain(full):
    """Every domain each model was tested on, the mean over the domains it never saw, and its dev-set
    accuracies (the selection domains), per seed and as mean ± std."""
    domains = [d for d in DOMAINS if any(d in accuracies(m["test"]) for runs in full.values() for m in runs)]
    dev = [d for d in DOMAINS if any(d in accuracies(m.get("dev")) for runs in full.values() for m in runs)]
    lines = ["", "## Cross-domain: every digit domain present, source-only", "",
             "Test accuracy (%) on each domain; the source domain's own column is in-domain. `unseen` is the mean over",
             "the test domains the model never trained on; `dev` columns are other domains' training files, the only",
             "target data recipes were chosen on (never SVHN for MNIST-trained models).", "",
             table_header(["experiment", "trained on", "seed"] + [TITLES[d] for d in domains] + ["unseen mean"]
                          + [f"dev {TITLES[d]}" for d in dev])]
    for name, runs in full.items():
        table = [(str(m["config"]["seed"]), [accuracies(m["test"]).get(d) for d in domains] + [unseen_mean(m)]
                  + [accuracies(m.get("dev")).get(d) for d in dev]) for m in runs]
        if len(runs) > 1:
            table.append(("mean ± std", [[r[1][i] for r in table if r[1][i] is not None] for i in range(len(table[0][1]))]))
        for seed, values in table:
            cells = [("—" if not v else mean_std(v)) if isinstance(v, list) else ("—" if v is None else f"{100 * v:.2f}")
                     for v in values]
            lines.append(f"| {name} | {runs[0]['config']['dataset'].upper()} | {seed} | " + " | ".join(cells) + " |")
    return lines


def selection(full):
    """What recipes are chosen on, without a test number: training health, the source validation split and the
    dev sets (other domains' training files), per run. The component table of a study."""
    dev = [d for d in DOMAINS if any(d in accuracies(m.get("dev")) for runs in full.values() for m in runs)]
    if not dev:
        return []
    lines = ["", "## Selection: what recipes are chosen on (no test set)", "",
             table_header(["experiment", "seed", "epochs", "train acc after epoch 1", "source val", *(f"dev {TITLES[d]}" for d in dev),
                           "dev mean", "wall time", "device"])]
    for name, runs in full.items():
        columns = []  # per run: epoch-1 train accuracy, validation, each dev set, the dev mean (fractions; None: absent)
        for m in runs:
            scores = accuracies(m.get("dev"))
            history = m.get("history") if isinstance(m.get("history"), list) else []
            first = history[0].get("train_acc") if history and isinstance(history[0], dict) else None
            columns.append([first if number(first) else None, m["best_val_acc"], *(scores.get(d) for d in dev),
                            sum(scores.values()) / len(scores) if scores else None])
            lines.append(f"| {name} | {m['config']['seed']} | {m['config']['epochs']} | "
                         + " | ".join("—" if v is None else f"{100 * v:.{1 if i == 0 else 2}f}"
                                      for i, v in enumerate(columns[-1]))
                         + f" | {duration(m['wall_time_s'])} | {m['device_name']} ({m['precision']}) |")
        if len(runs) > 1:  # what a three-seed rule reads: each column's mean ± std over the seeds, the slowest seed
            cells = [mean_std(present) if (present := [c[i] for c in columns if c[i] is not None]) else "—"
                     for i in range(len(columns[0]))]
            lines.append(f"| {name} | mean ± std | {joined(m['config']['epochs'] for m in runs)} | " + " | ".join(cells)
                         + f" | at most {duration(max(m['wall_time_s'] for m in runs))} | |")
    return lines


def adaptation(full, split="test"):
    """--tta: each target domain (split "test") or dev set ("dev": where methods are chosen) after adaptation,
    beside its source-only number; per seed, then the mean ± std over seeds of each, and of the paired change
    (adapted - source-only, same model)."""
    title = ("## Test-time adaptation (a separate evaluation: every table above is source-only)" if split == "test" else
             "## Test-time adaptation on the dev sets (their unlabelled train images: where a method is chosen)")
    lines = ["", title, "",
             "| experiment | seed | method | target | source-only % | after adaptation % | change (points) |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in full.items():
        pairs = {}  # (method, domain) -> [(source-only, adapted)] over seeds
        for m in runs:
            by_method = m.get(f"{split}_tta") if isinstance(m.get(f"{split}_tta"), dict) else {}
            for method, by_domain in by_method.items():
                for domain, value in accuracies(by_domain).items():
                    source_only = accuracies(m.get(split)).get(domain)
                    before, change = ("—", "—") if source_only is None else \
                        (f"{100 * source_only:.2f}", f"{100 * (value - source_only):+.2f}")
                    lines.append(f"| {name} | {m['config']['seed']} | {method} | {TITLES[domain]} | {before} | "
                                 f"{100 * value:.2f} | {change} |")
                    if source_only is not None:
                        pairs.setdefault((method, domain), []).append((source_only, value))
        for (method, domain), both in pairs.items():
            if len(both) > 1:
                source_only, adapted = np.array(both).T
                change = 100 * (adapted - source_only)
                lines.append(f"| {name} | mean ± std | {method} | {TITLES[domain]} | {mean_std(source_only)} | "
                             f"{mean_std(adapted)} | {change.mean():+.2f} ± {change.std(ddof=1):.2f} |")
    return lines if len(lines) > 5 else []


PLACEHOLDERS = {"--data-dir": "<data>", "--results-dir": "<results-dir>"}


def portable(command):
    """A run's command as anyone can rerun it from the repository root: the data and results folders it named
    (a machine's own paths) written as <data> and <results-dir>."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    out = []
    for i, word in enumerate(words):
        flag = word.split("=", 1)[0]
        if flag in PLACEHOLDERS and "=" in word:
            word = f"{flag}={PLACEHOLDERS[flag]}"
        elif i and words[i - 1] in PLACEHOLDERS:
            word = PLACEHOLDERS[words[i - 1]]
        elif i and words[i - 1] == "--evaluate" and len(Path(word).parts) >= 3:  # a run's model.pt, wherever it was
            word = "<results-dir>/" + "/".join(Path(word).parts[-3:])
        out.append(word)
    return " ".join(w if "<results-dir>" in w or "<data>" in w else shlex.quote(w) for w in out)


def provenance(full):
    lines = ["", "## Where each number came from", "", "| experiment | seed | device | command |", "|---|---|---|---|"]
    for name, runs in full.items():
        lines += [f"| {name} | {m['config']['seed']} | {m.get('device_name', '?')} ({m.get('precision', '?')}) | "
                  f"`{portable(m.get('command', '?'))}` |" for m in runs]
    return lines


def published_table(directions):
    """The published rows of the directions these runs trained in, with their protocols and sources."""
    rows = [r for r in published() if r["direction"] in directions]
    if not rows:
        return []
    lines = ["", "## Published numbers beside ours (results/published.csv: each paper's protocol and source)", "",
             table_header(["direction", "method", "paper, year", "backbone, budget", "protocol", "SVHN", "MNIST",
                           "MNIST-M", "USPS", "SYN", "read from"])]
    for r in rows:
        cells = ["—" if r[d] is None else f"{r[d]:.2f}" for d in ("svhn", "mnist", "mnistm", "usps", "syn")]
        lines.append(f"| {r['direction']} | {r['method']} | {r['paper']}, {r['year'] or '—'} | "
                     f"{', '.join(x for x in (r['backbone'], r['budget']) if x) or '—'} | {r['protocol']} | "
                     + " | ".join(cells) + f" | {r['source']} |")
    return lines


def profile_label(config):
    return f"{config.get('dataset')}, subset {config.get('train_subset')}, {config.get('epochs')} epochs"


# Config fields that say where and how a run computed, not what it trained: runs differing only in these (and
# the seed) are seeds of one recipe. Test-time adaptation is evaluated apart from the source-only numbers.
NOT_RECIPE = {"seed", "data_dir", "results_dir", "overrides", "resume", "restart", "device", "amp", "deterministic",
              "sync_bn", "compile", "evaluate", "quick", "tta", "tent_lr", "tent_batch", "shot_lr", "t3a_filter",
              "dev_images", "dev_only", "blind"}
# A field a run's code did not have yet is read as its default, which keeps what that code did (a flag is added so).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def recipe(config):
    return tuple(sorted((k, str(v)) for k, v in {**DEFAULTS, **config}.items() if k not in NOT_RECIPE))


def recipe_label(config, others):
    """What tells this recipe from the others of its experiment: the profile first, then each differing field."""
    differing = sorted({k for other in others for k, v in other.items() if k not in NOT_RECIPE and config.get(k) != v}
                       | {k for other in others for k in config if k not in NOT_RECIPE and k not in other})
    if not differing:
        return ""
    profile = [profile_label(config)] if set(PROFILE_FIELDS) & set(differing) else []
    return ", ".join(profile + [f"{k}={config.get(k)}" for k in differing if k not in PROFILE_FIELDS])


def collect(root):
    """{row name: [finished metrics]} under root, and the files skipped with why. Runs of one experiment are
    averaged only when they differ in nothing but their seed (and where they ran): each recipe is its own row,
    named by what differs. Folders whose name is not a plain experiment name are skipped (no forged rows)."""
    found, skipped = {}, []
    for path in finished_files(root, "*"):
        metrics, problem = read_metrics(path)
        if metrics is None:
            skipped.append(f"{path.relative_to(root)}: {problem}")
        elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", path.parent.parent.name):
            skipped.append(f"{path.relative_to(root)!r}: not a plain experiment name")
        elif metrics.get("status") == "finished":
            found.setdefault(path.parent.parent.name, {}).setdefault(recipe(metrics["config"]), []).append(metrics)
    for old in sorted(root.glob("*/seed-*.old")):
        if not old.with_suffix("").exists():  # seed-K.old without seed-K: a swap cut between its two renames
            skipped.append(f"{old.relative_to(root)}: a swap cut between its renames; the next run of {old.parent.name} with "
                           f"--seed {old.name[5:-4]} completes or undoes it")
    rows = {}
    for name, recipes in found.items():
        configs = [{**DEFAULTS, **runs[0]["config"]} for runs in recipes.values()]
        for config, runs in zip(configs, recipes.values()):
            label = recipe_label(config, [c for c in configs if c is not config])
            rows[f"{name} ({label})" if label else name] = runs
    return rows, skipped


def evaluations(root, split):
    """{"<experiment> (--evaluate)": [evaluation records]}: `--evaluate` of finished runs' models. For split "dev",
    a seed's --dev-only file where there is one (the numbers a method was chosen on), else its full evaluation;
    for "test", full evaluations only. Unreadable records are left out; they are no run's result."""
    found = {}
    suffixes = (".evaluation.json", ".evaluation.dev.json") if split == "dev" else (".evaluation.json",)
    for suffix in suffixes:  # a later suffix replaces an earlier one's record of the same seed
        for path in sorted(root.glob(f"*/seed-*{suffix}")):
            if not re.fullmatch(r"seed-\d+", path.name[:-len(suffix)]):
                continue
            try:
                record = json.loads(readable_file(path, max_bytes=MAX_METRICS_BYTES).read_text())
            except (UserError, OSError, ValueError, RecursionError):
                continue
            if isinstance(record, dict) and isinstance(record.get("config"), dict) and "seed" in record["config"]:
                found.setdefault(f"{path.parent.name} (--evaluate)", {})[path.name[:-len(suffix)]] = record
    return {name: [by_seed[s] for s in sorted(by_seed, key=lambda s: int(s[5:]))] for name, by_seed in sorted(found.items())}


def selection_report(results_dir):
    """The text of `--selection-only`: what pilots are compared on, without a single test number: training health,
    source validation, the dev sets and adaptation to them, each run's command. Candidates are ranked here; the
    test sets are looked at once per frozen recipe, in the full report."""
    full, skipped = collect(Path(results_dir))
    full = dict(sorted(full.items()))
    evaluated = evaluations(Path(results_dir), "dev")
    lines = ["# Selection (no test set)", "",
             "Generated by `python -m common.report --selection-only --results-dir <results-dir>` from "
             "`<results-dir>/*/seed-*/metrics.json`:", "only what recipes are chosen on; no test number appears here."]
    lines += (selection(full) + adaptation({**full, **evaluated}, "dev") + provenance({**full, **evaluated})
              if full else ["", "No finished runs yet."])
    if skipped:
        lines += ["", "Skipped files:"] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def summary(results_dir, links=True):
    """The report's text; `links=False` when it is written away from the runs (--out elsewhere): no dead links."""
    root = Path(results_dir)
    full, skipped = collect(root)
    quick, skipped_quick = collect(root / "quick")
    skipped_quick = [f"quick/{line}" for line in skipped_quick]
    full, quick = dict(sorted(full.items())), dict(sorted(quick.items()))
    lines = ["# Results", "",
             "Generated by `python -m common.report --results-dir <results-dir>` from `<results-dir>/*/seed-*/metrics.json`. "
             "Test accuracy (%) of the",
             "epoch chosen on validation, mean ± std over seeds (one seed: the value). `subset N` rows trained on",
             "N images only: they are not comparable with the writeup's full-SVHN numbers.", ""]
    lines += [HEADER] + [row(name, runs, "" if links else None) for name, runs in full.items()] if full else ["No finished runs yet."]
    if quick:
        lines += ["", "## Smoke runs (--quick: 256 images, 1 epoch; they test the code, not the method)", "", HEADER]
        lines += [row(name, runs, "quick/" if links else None) for name, runs in quick.items()]
    if full:
        dev, test = evaluations(root, "dev"), evaluations(root, "test")
        lines += selection(full) + cross_domain(full) + adaptation({**full, **dev}, "dev") + adaptation({**full, **test})
        lines += published_table({direction(runs[0]["config"]["dataset"]) for runs in full.values()})
        both = {name: records + [r for r in test.get(name, []) if r not in records] for name, records in dev.items()}
        lines += provenance({**full, **both})  # dev holds a record of every evaluated seed: the full one, or --dev-only
    missing = [name for name in WRITEUP if not any(n.split(" (")[0] == name for n in full)]
    if missing:
        lines += ["", f"No results yet{' (smoke runs aside)' if quick else ''}: {', '.join(missing)}."]
    if skipped + skipped_quick:
        lines += ["", "Skipped files:"] + [f"- {s}" for s in skipped + skipped_quick]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default="results", help="where the runs are (default: results)")
    parser.add_argument("--out", help="where to write the summary (default: <results-dir>/summary.md)")
    parser.add_argument("--selection-only", action="store_true",
                        help="only what candidates are chosen on (validation, dev sets, their adaptation): no test number, "
                             "no figure")
    args = parser.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        sys.exit(f"error: --results-dir {args.results_dir} is not a folder")
    out = Path(args.out or Path(args.results_dir) / "summary.md")
    if out.suffix.lower() == ".png":
        sys.exit(f"error: --out {args.out}: the text goes there and the figure beside it as .png; name a .md file")
    figure = out.with_suffix(".png")
    if args.selection_only:
        try:
            write_text(out, selection_report(args.results_dir))
        except OSError as e:
            sys.exit(f"error: cannot write {out} ({e.strerror or type(e).__name__})")
        print(out.read_text() + f"\nwrote {out}")
        return
    try:
        text = summary(args.results_dir, links=out.resolve().parent == Path(args.results_dir).resolve())
        write_text(out, text)
        root = Path(args.results_dir)
        runs = dict(sorted(collect(root)[0].items())) or dict(sorted(collect(root / "quick")[0].items()))  # smoke runs alone
        if runs:
            directions = {direction(r[0]["config"]["dataset"]) for r in runs.values()}
            papers = [r for r in published() if r["direction"] in directions and r["method"] != "the writeup's 07"]
            try:
                plot_summary(runs, WRITEUP, papers, figure)
            except OSError as e:
                sys.exit(f"error: wrote {out}, but cannot write {figure} ({e.strerror or type(e).__name__})")
    except OSError as e:
        sys.exit(f"error: cannot write {out} ({e.strerror or type(e).__name__})")
    except KeyboardInterrupt:  # files are written whole or not at all: nothing half-written to report
        sys.exit(130)
    print(text + f"\nwrote {out}" + (f" and {figure}" if runs else ""))


if __name__ == "__main__":
    main()
