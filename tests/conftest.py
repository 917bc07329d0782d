"""Shared fixtures: the repository paths, the Multi30k copy, and a runner for console scripts."""

from __future__ import annotations

import gc
import gzip
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer_mt.data.directions import target_tags
from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
from transformer_mt.decoding.search import PrefixCache
from transformer_mt.formats.checkpoint import save_checkpoint, spm_bytes_to_tensor
from transformer_mt.model import Transformer

REPO = Path(__file__).resolve().parents[1]
SHARED_MULTI30K = (REPO / ".." / "shared" / "data" / "multi30k").resolve()
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _unfreeze_after_test() -> Iterator[None]:
    """Console scripts run in this process freeze what they loaded (``freeze_loaded``); after
    each test the collector gets those objects back, so one test's leftovers stay collectable."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The shared Multi30k copy; required in CI, skipped only on machines without it."""
    if not (SHARED_MULTI30K / "train.en.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"Multi30k not found at {SHARED_MULTI30K}")
        pytest.skip(f"Multi30k not found at {SHARED_MULTI30K}")
    return SHARED_MULTI30K


def run_cli(
    *args: str, cwd: Path = REPO, stdin: str | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts (tmt-*) and capture its output."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "runs",
    "sits",
    "on",
    "the",
    "red",
    "blue",
    "street",
    "park",
    "with",
    "ball",
    "child",
]


def write_gz(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(data)


def synthetic_corpus(raw: Path, n_train: int = 300) -> None:
    """A small en/xx corpus where the target is the source upper-cased."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", 20), ("test_2016_flickr", 20)):
        src = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(n)]
        write_gz(raw / f"{split}.en.gz", "".join(s + "\n" for s in src).encode())
        write_gz(raw / f"{split}.xx.gz", "".join(s.upper() + "\n" for s in src).encode())


@pytest.fixture
def corpus_root(tmp_path: Path) -> Path:
    """A directory with a 200-pair synthetic corpus in raw/ (see synthetic_overrides)."""
    synthetic_corpus(tmp_path / "raw", n_train=200)
    return tmp_path


def synthetic_overrides(root: Path) -> list[str]:
    """Hydra overrides that train the tiny model on ``synthetic_corpus(root / "raw")``."""
    return [
        "model=tiny",
        "data.corpus=synthetic",
        "data.tgt_lang=xx",
        f"data.raw_dir={root / 'raw'}",
        "data.shared_dir=null",
        "data.url=null",
        f"data.prepared_dir={root / 'prepared'}",
        "data.tokenizer.vocab_size=60",
        "trainer.max_tokens=256",
        "trainer.valid_max_sentences=5",
        "trainer.final_eval=false",
        "trainer.device=cpu",
    ]


# The ``model`` config section of small_transformer (build_model's keyword arguments).
SMALL_MODEL_CONFIG: dict[str, object] = dict(
    d_model=32,
    n_heads=4,
    n_encoder_layers=2,
    n_decoder_layers=2,
    d_ff=64,
    dropout=0.0,
    norm_first=True,
    max_positions=64,
)


def small_transformer(**overrides: object) -> Transformer:
    """A seeded, dropout-free 2+2-layer Transformer (d_model 32, vocab 50, pad 0) in eval mode."""
    torch.manual_seed(0)
    args: dict[str, object] = dict(vocab_size=50, pad_id=0, **SMALL_MODEL_CONFIG)
    args.update(overrides)
    return Transformer(**args).eval()  # type: ignore[arg-type]


def random_en_de_checkpoint(path: Path, pairs: Sequence[str] = ()) -> Path:
    """Save an untrained small en→de model (24 positions) with a SentencePiece model of
    :data:`WORDS` as a self-contained checkpoint at ``path``: for what needs no trained run.
    With ``pairs`` (``["en-de", "de-en"]``), a multilingual model of those directions, its
    tokenizer holding their target-language tags."""
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(400)]
    data = {"src_lang": "en", "tgt_lang": "de"}
    if pairs:
        data = {"src_lang": "mul", "tgt_lang": "mul", "pairs": list(pairs)}
    tags = target_tags(data)
    tokenizer = Tokenizer(train_sentencepiece(text, 80, "unigram", 1.0, user_symbols=tags))
    model = small_transformer(vocab_size=tokenizer.vocab_size, max_positions=24)
    state = {
        "model": model.state_dict(),
        "config": {"model": {**SMALL_MODEL_CONFIG, "max_positions": 24}, "data": data},
        "spm_model": spm_bytes_to_tensor(tokenizer.model_bytes),
        "step": 7,
        "epoch": 1,
    }
    save_checkpoint(path, state)
    return path


class FakeDecoder:
    """An ``IncrementalDecoder`` with next-token probabilities (over 8 ids) set by hand as a
    function of the prefix (BOS excluded); a prefix not in ``table`` gets ``default``."""

    pad_id = 0  # PAD; the tests' ids are PAD, UNK, BOS, EOS = 0, 1, 2, 3
    max_positions = 100

    def __init__(
        self, table: dict[tuple[int, ...], dict[int, float]], default: dict[int, float]
    ) -> None:
        self.table, self.default = table, default

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(src.size(0), src.size(1), 1), (src != 0)[:, None, None, :]

    def start_decoding(
        self, memory: torch.Tensor, memory_mask: torch.Tensor, group: int, max_steps: int
    ) -> PrefixCache:
        prefix = torch.empty(memory.size(0) * group, 0, dtype=torch.long)
        return PrefixCache(prefix, memory, memory_mask)

    def decode_step(self, last: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        cache.prefix = torch.cat([cache.prefix, last[:, None]], 1)
        out = torch.full((cache.prefix.size(0), 8), -math.inf)
        for row, tokens in enumerate(cache.prefix[:, 1:].tolist()):
            for token, p in self.table.get(tuple(tokens), self.default).items():
                out[row, token] = math.log(p)
        return out
