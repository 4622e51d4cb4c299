"""``python -m dino_fast.plot RUN [RUN ...]``: draw and compare training runs from their
``log.txt`` (ours, or the official ``main_dino.py`` logs): loss, lr, weight decay and, when
logged, teacher entropy / ln K, KL, prototypes in use, center norm and k-NN top-1.

Each RUN is an output folder (its ``log.txt`` is read) or a log file. Needs matplotlib
(``pip install 'dino-fast[monitor]'``).
"""
import argparse
import os

from dino_fast.cli.errors import MissingDependencyError, UserError, add_debug_flag, command
from dino_fast.monitoring.curves import draw, log_path, read_log


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser("dino_fast.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="output folder or log.txt file")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the "
                   "folder names)")
    p.add_argument("--output", default=None, help="image file (default: RUN/curves.png for one "
                   "run, compare.png for several)")
    p.add_argument("--title", default=None)
    add_debug_flag(p)
    return p


def default_label(run: str) -> str:
    """The run's folder name (the file's folder for a log file)."""
    path = os.path.abspath(run)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


@command
def main(argv=None) -> str:
    """Entry point; returns the image path written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    labels = args.labels or [default_label(run) for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} label(s) for {len(args.runs)} run(s)")
    if len(set(labels)) != len(labels):
        parser.error("runs need distinct labels: pass --labels")
    runs = {}
    for label, run in zip(labels, args.runs):
        try:
            runs[label] = read_log(log_path(run))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {run}: {err}") from err
    output = args.output or (os.path.join(args.runs[0], "curves.png")
                             if len(args.runs) == 1 and os.path.isdir(args.runs[0])
                             else "compare.png")
    try:
        draw(runs, output, args.title)
    except ImportError as err:
        raise MissingDependencyError("dino_fast.plot needs matplotlib: pip install "
                                     "'dino-fast[monitor]'") from err
    except ValueError as err:
        raise UserError(str(err)) from err
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
