"""`saesweep-store ls | rm | verify`: the activation stores in the cache, their sizes and keys."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saesweep.errors import SaesweepError
from saesweep.store import default_store_dir, list_stores, remove_store, verify_store


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{n_bytes} B"
        n_bytes /= 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saesweep-store", description=__doc__)
    parser.add_argument("--dir", type=Path, default=default_store_dir(), help="store directory (store.dir)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list stores with size, tokens and key")
    rm = commands.add_parser("rm", help="delete stores")
    rm.add_argument("names", nargs="+", help="store directory names (the digests `ls` prints), or 'all'")
    verify = commands.add_parser("verify", help="check every shard's checksum")
    verify.add_argument("names", nargs="*", help="store names; default all")
    args = parser.parse_args(argv)

    stores = list_stores(args.dir)
    try:
        if args.command == "ls":
            if not stores:
                print(f"no activation stores in {args.dir}")
            for s in stores:
                key = s["key"]
                state = "complete" if s["complete"] else "partial"
                print(f"{s['path'].name}  {_size(s['bytes']):>10}  {s['n_rows']:>12,} tokens  {state:8}  "
                      f"{key.get('model')}  {key.get('hook_point')}  {key.get('dtype')}")
            print(f"total {_size(sum(s['bytes'] for s in stores))} in {args.dir}")
        elif args.command == "rm":
            paths = [s["path"] for s in stores] if args.names == ["all"] else [args.dir / n for n in args.names]
            for path in paths:
                remove_store(path)
                print(f"removed {path}")
        else:
            chosen = [s for s in stores if not args.names or s["path"].name in args.names]
            problems = [p for s in chosen for p in verify_store(s["path"], s["shards"])]
            print("\n".join(problems) if problems else f"{len(chosen)} store(s): all shards intact")
            return 1 if problems else 0
    except SaesweepError as e:
        print(f"saesweep-store: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
