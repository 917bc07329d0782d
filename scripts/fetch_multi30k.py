"""Fetch the Multi30k Task 1 raw files (all splits of every language pair config) into data/raw.

Files come from ../shared/data/multi30k when it exists, else from the official repository.
Usage: python scripts/fetch_multi30k.py [data config name ...]   (default: all multi30k_*)
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from transformer_mt.cli.common import config_dir
from transformer_mt.data.corpus import CorpusError
from transformer_mt.data.directions import fetch_raw


def main(names: list[str]) -> int:
    """Fetch the raw files of each named data config; returns the exit status."""
    if not names:
        names = sorted(p.stem for p in (Path(config_dir()) / "data").glob("multi30k_*.yaml"))
    with initialize_config_dir(config_dir(), version_base="1.3"):
        for name in names:
            data_cfg = compose("train", overrides=[f"data={name}"]).data
            try:
                fetch_raw(data_cfg)
            except CorpusError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"{name}: raw files in {data_cfg.raw_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
