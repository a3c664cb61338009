"""The ``lmlab`` command line.

Usage::

    lmlab config apps/shakespeare/demo.yaml model.dim=128   # print the resolved config as YAML
    lmlab grid my_grid.yaml                                  # list the runs a grid expands to
    lmlab describe                                           # every config key with its type, default, help
    lmlab shards --tokenizer byte --out data/shk FILES...    # pretokenize a corpus (see lmlab.data.shards)

Config problems (unknown key, wrong type, bad YAML) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from lmlab.config import config_to_dict, describe, exit_on_config_error, load_config, load_grid


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    for cfg in load_grid(args.config, args.overrides):
        print(cfg.name)
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    print("\n".join(describe()))
    return 0


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "shards":
        from lmlab.data.shards import main as shards_main

        return shards_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="lmlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("config", _cmd_config, "print the resolved config of a YAML file with overrides"),
        ("grid", _cmd_grid, "list the run names a grid YAML expands to"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        p.set_defaults(fn=fn)
    p = sub.add_parser("describe", help="list every config key with its type, default and help")
    p.set_defaults(fn=_cmd_describe)
    sub.add_parser("shards", help="pretokenize a corpus into token shards (lmlab shards --help)")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
