"""Rebuilds a search's report.md and report.png from its summary.json.

  python -m blockft_jax.report --workdir runs/x
"""
import sys
from pathlib import Path

from blockft_jax import cli
from blockft_jax.search import report


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m blockft_jax.report",
                                description="Rebuild report.md and report.png from a search's "
                                            "summary.json.")
    parser.add_argument("--workdir", required=True, help="the search's workdir")
    args = parser.parse_args(argv)
    try:
        report.write(args.workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {Path(args.workdir) / 'report.md'} and report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
