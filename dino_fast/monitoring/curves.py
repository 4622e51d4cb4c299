"""Training curves from ``log.txt`` files (ours, or the official ``main_dino.py`` ones, whose lines
hold ``train_loss``, ``train_lr``, ``train_wd``, ``epoch`` and ``n_parameters``): one panel per
metric that any of the runs logged, one line per run. matplotlib is imported only to draw.
"""
import json
import math
import os

# (log.txt key, panel title), in panel order; panels no run has are left out
PANELS = (
    ("train_loss", "loss"),
    ("train_lr", "learning rate"),
    ("train_wd", "weight decay"),
    ("train_teacher_entropy_ratio", "teacher entropy / ln K"),
    ("train_kl", "KL(teacher || student), nats"),
    ("train_prototypes_used", "prototypes in use, exp H(mean P_t)"),
    ("train_center_norm", "center norm"),
    ("train_knn_top1", "k-NN top-1 (%)"),
)


def read_log(path: str) -> list[dict]:
    """The JSON lines of a ``log.txt`` (blank lines skipped); a ValueError names a bad line."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON log line ({err})") from err
            if not isinstance(entry, dict):
                raise ValueError(f"{path}, line {number}: not a JSON object")
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path} has no log lines yet")
    return entries


def log_path(run: str) -> str:
    """``run`` itself when it is a file, else ``run/log.txt``."""
    return run if os.path.isfile(run) else os.path.join(run, "log.txt")


def _series(entries: list[dict], key: str) -> tuple[list, list]:
    points = [(entry.get("epoch", i), entry[key]) for i, entry in enumerate(entries)
              if isinstance(entry.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _ln_k(entries: list[dict]) -> float | None:
    """ln K of a run that logged the entropy and its ratio (the loss's uniform level)."""
    for entry in entries:
        ratio = entry.get("train_teacher_entropy_ratio")
        if ratio:
            return entry["train_teacher_entropy"] / ratio
    return None


def draw(runs: dict[str, list[dict]], path: str, title: str | None = None):
    """Draw ``{label: log entries}`` to the image ``path`` (format from its extension)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(key, name) for key, name in PANELS
              if any(_series(entries, key)[0] for entries in runs.values())]
    if not panels:
        raise ValueError("none of the runs logged a metric to draw "
                         f"({', '.join(key for key, _ in PANELS)})")
    cols = 2 if len(panels) in (2, 4) else min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, name) in zip(axes.flat, panels):
        for label, entries in runs.items():
            epochs, values = _series(entries, key)
            if epochs:
                ax.plot(epochs, values, marker="." if len(epochs) < 30 else None, label=label)
            ln_k = _ln_k(entries) if key == "train_loss" else None
            if ln_k:
                ax.axhline(ln_k, color="grey", linestyle=":", linewidth=1)
        if key == "train_teacher_entropy_ratio":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.9 if title else 0.94,
                        wspace=0.28, hspace=0.55)  # fixed: tight_layout doubles the time
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"  # renamed when complete: a viewer never sees half an image
    fig.savefig(partial, dpi=80, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)
    os.replace(partial, path)
