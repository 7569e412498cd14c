"""`carbonscale whisper fill|verify`: merge a metric's history from its old owner's
files into the new owner's (fill), and prove nothing was left behind (verify)."""

from __future__ import annotations

import argparse
import sys

from carbonscale import CarbonscaleError, ExitStatus
from carbonscale.progress import Progress
from carbonscale.whisper import SKIPPED, fill, resolve_pair, verify

# Exit codes: 0 ok, 1 something was skipped or missing, 2 bad input.


def _check(args: argparse.Namespace) -> None:
    """Option ranges, as CarbonscaleError (one line, exit 2) rather than argparse's usage."""
    if not 1 <= args.jobs <= 256:
        raise CarbonscaleError(f"--jobs must be within 1..256, not {args.jobs}")
    if args.now is not None and not 0 < args.now < 2**32:
        raise CarbonscaleError(f"--now {args.now} is outside whisper's timestamps")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="source whisper file or directory tree")
    parser.add_argument("dst", metavar="DST", help="destination whisper file or directory tree")
    parser.add_argument(
        "-j", "--jobs", type=int, default=1, help="files handled in parallel (default %(default)s)"
    )
    parser.add_argument(
        "--now",
        type=int,
        help="take this unix time as now for the archives' windows (default: the clock)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "whisper",
        help="fill and verify whisper files and trees",
        description="Whisper files read and written directly: fill and verify.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    fill_parser = verbs.add_parser(
        "fill",
        help="fill gaps of DST with SRC's points (DST's points are never changed)",
        description=(
            "Fill every empty slot of DST from SRC: same precision first, finer SRC data "
            "aggregated with DST's method and xFilesFactor, never coarse into fine; inside "
            "the finest archive's window, DST's coarser archives get aggregates recomputed "
            "from the merged finer data. A point present in DST (0.0 included) is never "
            "changed. A missing DST becomes an exact copy (atomic). DST is written under "
            "flock(LOCK_EX), carbon's WHISPER_LOCK_WRITES lock. With directories, every *.wsp "
            "under SRC goes to the same relative path under DST. Exit 1 if a file was "
            "skipped (corrupt, unreadable), 2 on bad input."
        ),
    )
    _common(fill_parser)
    fill_parser.add_argument(
        "-n", "--dry-run", action="store_true", help="count what would be filled; write nothing"
    )
    fill_parser.add_argument(
        "--move-corrupt",
        action="store_true",
        help="rename a corrupt DST to DST.corrupt-<time> and copy SRC in its place",
    )
    fill_parser.set_defaults(func=run_fill)

    verify_parser = verbs.add_parser(
        "verify",
        help="check that every SRC point within DST's retention is in DST",
        description=(
            "Check that every SRC point within the window of a DST archive of the same "
            "precision is present in DST (any value: DST's own points win a fill). Points at "
            "a precision DST does not have are reported as unchecked. Exit 1 on a missing "
            "point, a missing DST or an unreadable file."
        ),
    )
    _common(verify_parser)
    verify_parser.set_defaults(func=run_verify)


def _progress(total: int) -> Progress:
    return Progress(total, unit="files")


def _print_json(report: dict) -> None:
    import json  # here: only --json pays for it at start-up

    print(json.dumps(report, indent=1, sort_keys=True))


def run_fill(args: argparse.Namespace) -> int:
    _check(args)
    kind, paths = resolve_pair(args.src, args.dst)
    progress = _progress(len(paths))
    summary = fill(
        args.src,
        args.dst,
        jobs=args.jobs,
        now=args.now,
        dry_run=args.dry_run,
        move_corrupt=args.move_corrupt,
        on_result=lambda _result: progress.advance(),
        paths=paths,
    )
    progress.finish()
    skipped = summary.skipped
    if kind == "file" and skipped:
        # One file asked for, and it is unusable: bad input, like any other.
        raise CarbonscaleError(skipped[0].reason)
    for result in sorted(skipped, key=lambda r: r.path):
        print(f"carbonscale: skipped {result.path}: {result.reason}", file=sys.stderr)
    if args.json:
        _print_json(summary.as_dict())
    else:
        print(f"fill: {summary.line()}")
    return (
        ExitStatus.PROBLEM if any(r.status == SKIPPED for r in summary.results) else ExitStatus.OK
    )


def run_verify(args: argparse.Namespace) -> int:
    _check(args)
    kind, paths = resolve_pair(args.src, args.dst)
    progress = _progress(len(paths))
    summary = verify(
        args.src,
        args.dst,
        jobs=args.jobs,
        now=args.now,
        on_result=lambda _result: progress.advance(),
        paths=paths,
    )
    progress.finish()
    report = summary.as_dict()
    if kind == "file" and summary.results[0].error:
        raise CarbonscaleError(summary.results[0].error)
    if args.json:
        _print_json(report)
    else:
        for entry in report["errors"]:
            print(f"carbonscale: {entry['path']}: {entry['error']}", file=sys.stderr)
        for path in report["dst_missing"]:
            print(f"carbonscale: {path}: DST is missing", file=sys.stderr)
        for entry in report["missing"]:
            print(
                f"carbonscale: {entry['path']}: {entry['missing']} of {entry['checked']} "
                f"points missing (e.g. {', '.join(map(str, entry['examples']))})",
                file=sys.stderr,
            )
        print(
            f"verify: {report['files']} files, {report['points_checked']} points checked, "
            f"{report['points_missing']} missing in {report['files_with_missing_points']} files, "
            f"{len(report['dst_missing'])} DST missing, {len(report['errors'])} errors, "
            f"{report['points_unchecked']} unchecked (no DST archive of their precision)"
        )
    return ExitStatus.OK if summary.ok else ExitStatus.PROBLEM
