"""Where the samples of a py-spy profile went (`bench_operator_scale.py --profile DIR` writes
one folded file per run: a line per distinct stack, `frame;frame;... count`).

    python bench/fold_summary.py DIR/ftj-current-1000.folded [--top 30] [--match refresh_status ...]

Prints the share of samples per function inclusive of what it called (a function counted once
per stack however deep it recurses), the top functions by own samples, and for each --match
substring the share of stacks that contain a frame with it.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def frames_of(stack: str) -> list[str]:
    out = []
    for raw in stack.split(";"):
        m = FRAME.match(raw.strip())
        if m is None:
            out.append(raw.strip())
            continue
        path = m["file"]
        short = "/".join(path.split("/")[-2:])
        out.append(f"{m['func']} ({short})")
    return out


def read(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                stacks.append((frames_of(stack), int(count)))
            except ValueError:
                continue
    return stacks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folded")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", nargs="*", default=[])
    args = parser.parse_args(argv)
    stacks = read(args.folded)
    total = sum(c for _, c in stacks) or 1
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        for name in set(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    print(f"{total} samples")
    print(f"\n-- inclusive (top {args.top})")
    for name, count in inclusive.most_common(args.top):
        print(f"{100 * count / total:6.1f}%  {name}")
    print(f"\n-- own (top {args.top})")
    for name, count in own.most_common(args.top):
        print(f"{100 * count / total:6.1f}%  {name}")
    if args.match:
        print("\n-- stacks containing")
        for needle in args.match:
            count = sum(c for frames, c in stacks if any(needle in f for f in frames))
            print(f"{100 * count / total:6.1f}%  {needle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
