"""Maintainer script: make the published MLX variants of a Z-Image checkpoint in one go.

    python convert/make_variants.py Tongyi-MAI/Z-Image-Turbo --out dist/
      → dist/Z-Image-Turbo-mlx-bf16, -8bit, -4bit, -dit4-te8
    python convert/make_variants.py Tongyi-MAI/Z-Image-Turbo --out dist/ --upload OWNER
      → also publishes each as OWNER/Z-Image-Turbo-mlx-4bit etc. (model card included; docs/hub.md)

Thin on purpose: every variant is one call of zimage_mlx.loading.convert.convert and, with --upload, one of
zimage_mlx.loading.publish.upload (which hold all the logic).
"""

import argparse
import sys
from pathlib import Path

from zimage_mlx.loading.convert import convert
from zimage_mlx.loading.publish import upload

VARIANTS = {
    "bf16": None,
    "8bit": {"transformer": 8, "text_encoder": 8},
    "4bit": {"transformer": 4, "text_encoder": 4},
    "dit4-te8": {"transformer": 4, "text_encoder": 8},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="hub id or Hugging Face-layout directory")
    ap.add_argument("--out", type=Path, required=True, help="parent directory of the variants")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--upload", metavar="OWNER", help="publish each variant as OWNER/<name>-mlx-<variant>")
    ap.add_argument("--private", action="store_true", help="with --upload: create the repositories private")
    ap.add_argument("--dry-run", action="store_true", help="with --upload: write the cards, list, send nothing")
    args = ap.parse_args(argv)
    stem = Path(str(args.source).rstrip("/")).name
    for name in args.variants.split(","):
        if name not in VARIANTS:
            sys.exit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        out = convert(args.out / f"{stem}-mlx-{name}", args.source, dtype="bfloat16", quantize=VARIANTS[name],
                      group_size=args.group_size, overwrite=args.overwrite)
        if args.upload:
            upload(out, f"{args.upload}/{out.name}", private=args.private, dry_run=args.dry_run,
                   overwrite=args.overwrite)


if __name__ == "__main__":
    main()
