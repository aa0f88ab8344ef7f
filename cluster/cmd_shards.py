"""``condmoe shards write|verify|inspect``: build, check and summarise WebDataset shard sets."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from condmoe.datasets import summarize_shards, verify_shards, write_shards

SOURCE_HELP = ("fashion_mnist[:DIR] | digits | imagefolder:PATH | webdataset:DIR_OR_PATTERN | "
               "synthetic:n=N,size=S,channels=C,classes=K | photolike:n=N,classes=K (generated photo-like JPEGs)")

# 2000 Fashion-MNIST samples (28x28 PNG + label, tar headers included) are ~4.6 MB: each split has
# several shards (train 27, val 3, test 5), so ranks and loader workers all own whole shards, and a
# shard is still one sequential read; 224x224 RGB images make shards of a few hundred MB, within
# WebDataset's advice (100 MB - 1 GB) as well
DEFAULT_SAMPLES_PER_SHARD = 2000


def _source_and_out(args: argparse.Namespace) -> tuple[str, str]:
    """SOURCE and OUT, given as positionals or as --source/--out."""
    given = [a for a in (args.source, args.out) if a is not None]
    source = args.source_flag if args.source_flag is not None else (given.pop(0) if given else None)
    out = args.out_flag if args.out_flag is not None else (given.pop(0) if given else None)
    if source is None or out is None or given:
        got = " ".join(a for a in (args.source, args.out, args.source_flag, args.out_flag) if a) or "nothing"
        raise ValueError(f"give SOURCE and OUT once each (e.g. fashion_mnist data/fashion_mnist), "
                         f"got: {got}")
    return source, out


def _write(args: argparse.Namespace) -> int:
    source, out = _source_and_out(args)
    console = Console(stderr=True)
    with Progress(TextColumn("writing shards"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=args.no_progress or not console.is_terminal) as bar:
        task = bar.add_task("write", total=None)

        def progress(done: int, total: int) -> None:
            if done % 256 == 0 or done == total:
                bar.update(task, completed=done, total=total)

        out = write_shards(source, out, samples_per_shard=args.samples_per_shard,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                           limit=args.limit, image_size=args.image_size, channels=args.channels,
                           shorter_side=args.shorter_side, jpeg_quality=args.jpeg_quality,
                           overwrite=args.overwrite, progress=progress)
    summary, _ = summarize_shards(out)
    print(f"wrote {sum(s.samples for s in summary)} samples in {sum(s.shards for s in summary)} shards to {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify_shards(args.dir)
    for bad in report.bad:
        print(f"BAD {bad.shard}: {bad.reason}")
    for name in report.unlisted:
        print(f"note: {name} is not listed in the manifest")
    status = "OK" if report.ok else f"{len(report.bad)} bad shard(s)"
    print(f"{status}: checked {report.checked} shards, {report.samples} samples in good shards, {report.folder}")
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    summary, meta = summarize_shards(args.dir)
    classes = meta.get("classes", [])
    table = Table(title=f"{args.dir}  source={meta.get('source', '?')}  "
                        f"image={meta.get('channels', '?')}x{meta.get('height') or 'any'}x{meta.get('width') or 'any'}")
    for col in ("split", "shards", "samples", "MB", "min/max class", "class counts"):
        table.add_column(col, justify="left" if col in ("split", "class counts") else "right")
    for s in summary:
        counts = " ".join(f"{classes[i] if i < len(classes) else i}={c}" for i, c in enumerate(s.class_counts))
        table.add_row(s.split, str(s.shards), str(s.samples), f"{s.bytes / 1e6:.1f}", f"{s.balance:.2f}", counts)
    Console(file=sys.stdout, width=200).print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``shards`` with its ``write``, ``verify`` and ``inspect`` subcommands."""
    p = subparsers.add_parser("shards", help="write, verify and inspect WebDataset shard sets")
    sub = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    w = sub.add_parser("write", help="write a source as {split}-%%06d.tar shards + manifest.parquet",
                       usage="%(prog)s SOURCE OUT [options]",
                       description="e.g. condmoe shards write fashion_mnist data/fashion_mnist")
    w.add_argument("source", nargs="?", metavar="SOURCE", help=SOURCE_HELP)
    w.add_argument("out", nargs="?", metavar="OUT", help="output folder (published atomically when complete)")
    # the flag spelling of the two positionals (scripts written before they were positional)
    w.add_argument("--source", dest="source_flag", metavar="SOURCE", help=argparse.SUPPRESS)
    w.add_argument("--out", dest="out_flag", metavar="OUT", help=argparse.SUPPRESS)
    w.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                   help=f"samples in each shard (default {DEFAULT_SAMPLES_PER_SHARD}: Fashion-MNIST's 54000 "
                        "train samples make 27 shards of ~4.6 MB, so every rank and loader worker owns whole "
                        "shards; 224x224 RGB images make shards of a few hundred MB)")
    w.add_argument("--val-fraction", type=float, default=0.1, help="share of the train data held out as val")
    w.add_argument("--test-fraction", type=float, default=0.2, help="test share for sources without a test split")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--limit", type=int, default=None, help="at most this many samples per source split")
    w.add_argument("--image-size", type=int, default=None,
                   help="imagefolder: decode and resize to SIZE x SIZE (PNG); default: keep each file's bytes")
    w.add_argument("--shorter-side", type=int, default=None,
                   help="imagefolder/webdataset: shrink images whose shorter side exceeds this (re-encoded)")
    w.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of images --shorter-side shrinks")
    w.add_argument("--channels", type=int, choices=(1, 3), default=None, help="imagefolder: 1 gray or 3 RGB")
    w.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_write)

    v = sub.add_parser("verify", help="check every shard against the manifest; exit 1 when any is bad")
    v.add_argument("dir")
    v.set_defaults(func=_verify)

    i = sub.add_parser("inspect", help="table of splits, shards, samples and class balance")
    i.add_argument("dir")
    i.set_defaults(func=_inspect)
