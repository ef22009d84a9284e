"""Assemble one ensemble from the weights folders of several training runs.

    python train/merge.py runs/lite0/weights runs/lite1/weights --out weights
    python train/merge.py runs/a/weights runs/b/weights --out weights --weight 2 1 --overwrite
    python train/merge.py runs/recipe/weights --keep efficientnet_lite0 convnext_atto --out weights

``--keep`` ships only the experts that earn their place (``evaluation/ensembles.py`` says which).

Experts trained in separate runs (a new backbone added to a shipped ensemble, or runs too long to train
together on one machine) are averaged like jointly trained ones. Every input is verified (sha256) when
loaded; the output is written atomically, and its manifest keeps each run's training record.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # experts (torch) is imported when merging: --help stays instant
    from experts import Expert


def merge_weights(folders: list[str | Path], out: str | Path, weights: list[float] | None = None,
                  keep: list[str] | None = None) -> Path:
    """Write the experts of ``folders`` (in order) as one weights folder; keys must not collide.

    ``keep``: only these expert keys (every one must exist in some folder); default all.

    Raises:
        ValueError: ``weights`` or ``keep`` do not fit the folders.
        experts.WeightsError: a folder is not a valid weights folder, or two hold the same expert key.
    """
    from experts import WeightsError, read_manifest, save_ensemble
    from experts.weights import load_expert

    if weights is not None and len(weights) != len(folders):
        raise ValueError(f"{len(weights)} weights given for {len(folders)} folders")
    if keep is not None:
        available = {e["key"] for folder in folders for e in read_manifest(folder)["experts"]}
        unknown = sorted(set(keep) - available)
        if unknown:
            raise ValueError(f"--keep {unknown}: no such expert; the folders hold {sorted(available)}")
    experts: dict[str, Expert] = {}
    ensemble_weights, records, expert_metadata = {}, [], {}
    for i, folder in enumerate(folders):
        manifest = read_manifest(folder)
        records.append({"folder": str(folder), "training": manifest.get("training"),
                        "val_metrics": manifest.get("val_metrics")})
        for entry in manifest["experts"]:
            key = entry["key"]
            if keep is not None and key not in keep:
                continue
            if key in experts:
                raise WeightsError(f"{folder}: expert key {key!r} is already taken by an earlier folder")
            experts[key] = load_expert(folder, entry)
            ensemble_weights[key] = float(entry.get("weight", 1.0)) * (weights[i] if weights else 1.0)
            expert_metadata[key] = {k: v for k, v in entry.items() if k == "val_metrics"} | {"run": i}
    return save_ensemble(experts, out, weights=ensemble_weights, expert_metadata=expert_metadata,
                         metadata={"merged_from": records})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="weights folders (written by train/joint.py, train/heads.py or this command)")
    p.add_argument("--out", required=True, help="the merged weights folder")
    p.add_argument("--weight", type=float, nargs="+", metavar="W",
                   help="one ensemble weight per input folder, multiplying its experts' own (default: 1 each)")
    p.add_argument("--keep", nargs="+", metavar="KEY", help="only these experts (default: every expert)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    from experts import WeightsError, read_manifest
    if Path(args.out).exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        out = merge_weights(args.folders, args.out, args.weight, args.keep)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(read_manifest(out)['experts'])} experts into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
