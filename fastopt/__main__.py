"""``python -m fastopt info | bench step|ns|pretrain [...]`` (also the ``fastopt`` console script)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which backends can run here")
    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("which", choices=["step", "ns", "pretrain"],
                       help="step: optimizer step throughput; ns: Newton-Schulz engine throughput; "
                            "pretrain: end-to-end pretraining speed-ups")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        from ._info import collect, format_info

        print(format_info(collect()))
        return 0
    if args.which == "ns":
        from .benchmarks import newton_schulz

        return newton_schulz.main(rest)
    if args.which == "pretrain":
        from .benchmarks import pretrain

        return pretrain.main(rest)
    from .benchmarks import step_throughput

    return step_throughput.main(rest)


if __name__ == "__main__":
    sys.exit(main())
