"""Command line: ``dpmove info``, ``dpmove bench ssd``, ``dpmove bench net``, ``dpmove bench qos`` and
``dpmove bench copy``, ``dpmove bench store``, ``dpmove bench graph`` and ``dpmove sim``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _print_info(d: dict, indent: int = 0) -> None:
    pad = "  " * indent
    width = max((len(k) for k in d), default=0)
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{pad}{k}:")
            _print_info(v, indent + 1)
        else:
            print(f"{pad}{k:<{width}}  {v}")


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import info

    d = info(args.path)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_info(d)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dpmove", description="dpmove: KV-cache data movement")
    sub = p.add_subparsers(dest="cmd", required=True)

    pi = sub.add_parser("info", help="version, backends and what works on this host")
    pi.add_argument("--path", help="also probe O_DIRECT support and alignment of this file or directory")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(func=_cmd_info)

    pb = sub.add_parser("bench", help="microbenchmarks")
    bsub = pb.add_subparsers(dest="bench", required=True)
    from .bench import copy as bench_copy, net as bench_net, qos as bench_qos, ssd, store as bench_store
    from .bench import graph as bench_graph

    ssd.add_parser(bsub)
    bench_net.add_parser(bsub)
    bench_qos.add_parser(bsub)
    bench_copy.add_parser(bsub)
    bench_graph.add_parser(bsub)
    bench_store.add_parser(bsub)

    from .sim import cli as sim_cli

    sim_cli.add_parser(sub)

    args = p.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError) as exc:  # bad arguments, or the OS refused: say why, no traceback
        print(f"dpmove {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
