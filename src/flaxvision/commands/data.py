"""`flaxvision data pack`: convert a dataset into WebDataset or ArrayRecord shards with a manifest."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  flaxvision data pack ethz/food101 --out /data/food101-wds --resize 256 --quality 90
  flaxvision data pack ./imagenet_folder --out /data/imagenet-ar --format arrayrecord --shard-size 512MB --workers 8
  flaxvision train --dataset /data/food101-wds ...      # each process then reads only its share of the shards"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data", help="prepare datasets (pack into shards)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Dataset tools. `pack` converts any dataset flaxvision reads (image folder, parquet, "
        "save_to_disk, Hub) into shards that many hosts stream, each reading only its share.",
    )  # fmt: skip
    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    pack = tools.add_parser(
        "pack", help="convert a dataset into shards", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write every labelled split of SRC as WebDataset tar shards (key.jpg + key.cls) or ArrayRecord "
        "shards, with DIR/manifest.json (class names, counts per shard and class, sha256 checksums) and a per-split "
        "index. DIR appears only when all of it is written.",
    )  # fmt: skip
    pack.add_argument("source", metavar="SRC", help="a Hub id, save_to_disk dir, parquet files, an image folder, tar shards")
    pack.add_argument("--out", required=True, metavar="DIR", help="the directory to create")
    pack.add_argument("--format", choices=("wds", "arrayrecord"), default="wds", help="shard format (default wds)")
    pack.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 1GB, 256MB (default 1GB)")
    pack.add_argument("--resize", type=int, metavar="S", help="shrink images whose shorter side is over S to S (JPEG)")
    pack.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality of resized images (default 90)")
    pack.add_argument("--split", action="append", dest="splits", metavar="NAME", help="pack only this split (repeatable)")
    pack.add_argument("--workers", type=int, default=0, help="encoding processes (default 0: this process)")
    pack.add_argument("--seed", type=int, default=0, help="seed of the order examples are written in (default 0)")
    pack.add_argument("--keep-order", action="store_true",
                      help="write examples in the source's order (by default shuffled: sources are often sorted by class)")  # fmt: skip
    pack.add_argument("--image-column", help="the image column, when detection is not enough")
    pack.add_argument("--label-column", help="the label column, when detection is not enough")
    pack.add_argument("--overwrite", action="store_true", help="replace DIR when it holds something")
    pack.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    pack.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from flaxvision.data.pack import pack, parse_size

    out = pack(args.source, args.out, kind=args.format, shard_size=parse_size(args.shard_size), resize=args.resize,
               quality=args.quality, splits=args.splits, workers=args.workers, image_column=args.image_column,
               label_column=args.label_column, overwrite=args.overwrite, progress=args.progress,
               seed=None if args.keep_order else args.seed)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        skipped = len(manifest["skipped"].get(split, []))
        print(f"{split}: {info['count']} images in {len(info['shards'])} shards"
              + (f" ({skipped} unreadable left out, listed in manifest.json)" if skipped else ""))  # fmt: skip
    print(f"flaxvision: wrote {out} ({manifest['kind']}, {manifest['seconds']:.1f} s)")
    return 0
