"""Fetch, convert and cache offline base weights ahead of first use: ``python -m experts.fetch [NAME ...]``.

``.ci/run`` runs it at install time, so that no test downloads anything; a user never needs to (the first
``infer.py`` run fetches what the shipped model needs), but may, e.g. before going offline.
"""
from __future__ import annotations

import argparse
import sys

from experts.base_weights import BASE_WEIGHTS, BaseWeightsError, fetch_base_weights  # cheap: no numpy, torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=sorted(BASE_WEIGHTS), help=f"default: all ({', '.join(BASE_WEIGHTS)})")
    args = p.parse_args(argv)
    try:
        for name in args.names:
            print(f"{name}: {fetch_base_weights(name)}")
    except BaseWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
