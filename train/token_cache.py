"""Cache a frozen CLIP tower's per-layer tokens for every labelled image, so heads train in seconds.

A full backward pass through ViT-B/16 runs at a few images per second on a 2-core CPU (``bench/train_speed.py``);
a frozen tower needs one forward pass per image, ever. This module runs it once over labels CSVs and keeps,
per image and per layer, the class token and the means of a ``g x g`` grid of patch tokens, all through the
tower's final LayerNorm (:meth:`experts.clip.ClipExpert.layer_tokens`, the very code the expert scores
with). ``train/heads.py`` then fits linear or LIB heads on any layer or set of layers, on cluster folds,
in seconds, and writes experts that ``infer.py`` loads.

    python train/token_cache.py ../shared/data/*/labels.csv --out runs/tokens/clip_vit_b16-224
    python train/token_cache.py ../shared/data/*/labels.csv --input-size 160 \\
        --out runs/tokens/clip_vit_b16-160                   # the cache the shipped head was trained on

Images go through the validation protocol's transform (resize, then the JPEG quality of
:mod:`core.protocol` for both classes), so the cache cannot carry the classes' different compression
histories (the ``gan_faces`` trap) into a head. Shards of ``--shard-size`` images are written atomically;
running the command again resumes. A folder holding a cache made with other settings is refused
(:class:`CacheMismatchError`; the command exits 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from core.protocol import VALIDATION_JPEG_QUALITY

if TYPE_CHECKING:  # the heavy imports happen in the functions: the command's --help stays instant
    import numpy as np
    import pandas as pd

INDEX = "index.csv"
META = "cache.json"


class CacheMismatchError(ValueError):
    """A cache folder that holds a cache made with other settings than those asked for."""


def shard_path(out: Path, i: int) -> Path:
    """The file of shard ``i`` of the cache in ``out``."""
    return out / f"shard-{i:05d}.safetensors"


def build_cache(csvs: Sequence[str | Path], out: str | Path, *, expert_name: str = "clip_vit_b16",
                pretrained: str = "clip_vit_b16_openai", input_size: int = 224, grid: int = 2,
                jpeg_quality: int = VALIDATION_JPEG_QUALITY, batch_size: int = 32, workers: int = 2,
                shard_size: int = 512, progress: bool = True) -> Path:
    """Embed every image of ``csvs`` into ``out`` (see the module docstring); returns ``out``.

    Every layer of the tower is kept (``[N, n_layers, 1 + grid * grid, D]`` float16 over the shards), so
    the choice of layers, depth and head comes after, from numbers.

    Raises:
        CacheMismatchError: ``out`` holds a cache made with other settings.
        core.labels.LabelsError: a labels CSV cannot be used.
    """
    import numpy as np
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader

    from core.dataset import ImageDataset
    from core.files import atomic_output, atomic_write
    from core.labels import read_labels
    from core.progress import progress_bar, write_line
    from core.transforms import shortcut_free_eval_transform
    from experts import create_expert
    from experts.clip import ClipExpert

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Each CSV's rows in a seeded random order: the shards fill in that order, so the finished part of a
    # cache that is still growing is a fair sample of every set (``load_cache(..., partial=True)``).
    rows = pd.concat([read_labels(c).assign(set=Path(c).parent.name).sample(frac=1.0, random_state=0)
                      for c in csvs], ignore_index=True)
    expert = create_expert(expert_name, pretrained=pretrained, input_size=input_size).eval()
    if not isinstance(expert, ClipExpert):
        raise ValueError(f"{expert_name}: the token cache needs a CLIP expert")
    layers = list(range(1, expert.config.backbone_config["num_hidden_layers"] + 1))
    meta = {"expert": expert_name, "pretrained": pretrained, "input_size": input_size, "grid": grid,
            "jpeg_quality": jpeg_quality, "layers": layers, "config": expert.config.to_dict(),
            "csvs": [str(c) for c in csvs], "n": len(rows), "shard_size": shard_size}
    _check_same_cache(out, meta)
    with atomic_output(out / INDEX) as tmp:
        rows.to_csv(tmp, index=False)
    atomic_write(out / META, json.dumps(meta, indent=2) + "\n")

    transform = {input_size: shortcut_free_eval_transform(input_size, jpeg_quality)}
    n_shards = (len(rows) + shard_size - 1) // shard_size
    todo = [i for i in range(n_shards) if not shard_path(out, i).is_file()]
    bar = progress_bar(total=len(rows), initial=(n_shards - len(todo)) * shard_size if todo else len(rows),
                       desc="tokens", unit="img", enabled=progress)
    for i in todo:
        part = rows.iloc[i * shard_size:(i + 1) * shard_size]
        dataset = ImageDataset(part["path"].tolist(), transform, part["target"].tolist())
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        tokens, errors = [], []
        with torch.inference_mode():
            for batch in loader:
                x = expert.normalize(batch["images"][input_size])
                tokens.append(expert.layer_tokens(x, layers, grid).half().numpy())
                errors += list(batch["error"])
                bar.update(len(x))
        ok = np.array([not e for e in errors])
        for e in errors:
            if e:
                write_line(f"warning: {e} (left out of the cache)")
        with atomic_output(shard_path(out, i)) as tmp:
            _save_shard(np.concatenate(tokens), ok, str(tmp))
    bar.close()
    return out


def _save_shard(tokens: np.ndarray, ok: np.ndarray, path: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"tokens": tokens, "ok": ok.astype(np.uint8)}, path)


def _check_same_cache(out: Path, meta: dict[str, Any]) -> None:
    """Refuse to resume into a cache made with other settings (its shards would mix two embeddings):
    :class:`CacheMismatchError` naming the settings that differ."""
    old = out / META
    if old.is_file():
        previous = json.loads(old.read_text())
        differ = sorted(k for k in set(previous) | set(meta) if k != "config" and previous.get(k) != meta.get(k))
        if differ:
            raise CacheMismatchError(f"{out} holds a cache made with other settings ({', '.join(differ)} differ; "
                                     f"see {old}); use another --out")


def load_cache(folder: str | Path, partial: bool = False) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """``(rows, tokens, meta)``: the index (one row per image, with ``ok``), ``[N, L, 1 + g * g, D]`` float16
    tokens (zeros for unreadable images) and the cache's settings.

    ``partial=True`` returns the finished leading shards of a cache still being built (a seeded random
    sample of each set, in the order of the CSVs) instead of refusing it.

    Raises:
        FileNotFoundError: ``folder`` holds no cache, or (without ``partial``) an unfinished one.
    """
    import numpy as np
    import pandas as pd
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / META).is_file():
        raise FileNotFoundError(f"{folder}: not a token cache (no {META}); make one with train/token_cache.py")
    meta = json.loads((folder / META).read_text())
    rows = pd.read_csv(folder / INDEX, keep_default_na=False)
    n_shards = (len(rows) + meta["shard_size"] - 1) // meta["shard_size"]
    missing = [i for i in range(n_shards) if not shard_path(folder, i).is_file()]
    if missing and not partial:
        raise FileNotFoundError(f"{folder}: {len(missing)} of {n_shards} shards missing; run the cache command "
                                "again to finish it")
    n_shards = missing[0] if missing else n_shards
    rows = rows.iloc[: min(len(rows), n_shards * meta["shard_size"])].copy()
    shards = [load_file(str(shard_path(folder, i))) for i in range(n_shards)]
    rows["ok"] = np.concatenate([s["ok"] for s in shards]).astype(bool)
    return rows, np.concatenate([s["tokens"] for s in shards]), meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csvs", nargs="+", metavar="CSV", help="labels CSVs (img_name,target[,group,source])")
    p.add_argument("--out", required=True, type=Path,
                   help="cache folder (created; a cache already there with the same settings is resumed)")
    p.add_argument("--expert", default="clip_vit_b16", help="the CLIP expert whose tower embeds (default: %(default)s)")
    p.add_argument("--pretrained", default="clip_vit_b16_openai",
                   help="its base weights: an offline base name or a local folder (default: %(default)s)")
    p.add_argument("--input-size", type=int, default=224,
                   help="image side in pixels fed to the tower (default: %(default)s)")
    p.add_argument("--grid", type=int, default=2,
                   help="regions per side whose patch-token means are kept, for LIB heads (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=VALIDATION_JPEG_QUALITY,
                   help="images of both classes are re-encoded at this JPEG quality, as validation does "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 0, one per CPU not taken by --workers)")
    p.add_argument("--shard-size", type=int, default=512,
                   help="images per shard file, each written atomically (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    args = p.parse_args(argv)

    from core.device import DeviceError, set_threads
    from core.labels import LabelsError

    try:
        set_threads(args.threads, args.workers)
        out = build_cache(args.csvs, args.out, expert_name=args.expert, pretrained=args.pretrained,
                          input_size=args.input_size, grid=args.grid, jpeg_quality=args.jpeg_quality,
                          batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                          progress=not args.quiet)
    except (CacheMismatchError, DeviceError, LabelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"token cache: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
