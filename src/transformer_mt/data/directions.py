"""Which corpora a ``data`` config names, and for which translation directions.

``data.train`` lists one or several corpora (concatenated), ``data.valid`` one and
``data.test`` any number, each scored on its own and named by its file; each entry is a path
prefix (:class:`~transformer_mt.data.corpus.ParallelCorpus`).

A multilingual config lists language pairs, ``data.pairs: [en-de, en-fr, de-en, ...]``: each
path prefix then names one corpus per pair (``P.en`` with ``P.de``, ``P.en`` with ``P.fr``,
...), and every source sentence starts with its target language's tag, ``<2de>`` (Johnson et
al. 2017, "Google's Multilingual Neural Machine Translation System"). An entry may instead be
``{path: P, pairs: [en-de, de-en]}``, a corpus for those directions only (one that is not
aligned across every language, or synthetic data for some directions). Every direction needs
a training corpus and exactly one val corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformer_mt.data.corpus import ParallelCorpus, fetch_corpus
from transformer_mt.errors import ConfigError

__all__ = [
    "ROLES",
    "corpora",
    "fetch_raw",
    "is_multilingual",
    "language_pairs",
    "languages",
    "read_references",
    "target_tag",
    "target_tags",
]

ROLES = ("train", "valid", "test")


def target_tag(lang: str) -> str:
    """The token that asks a multilingual model for language ``lang``: ``<2de>``."""
    return f"<2{lang}>"


Pairs = tuple[tuple[str, str], ...]


def _parse_pair(item: Any, key: str) -> tuple[str, str]:
    """``"src-tgt"`` -> ``("src", "tgt")``; ConfigError naming ``key`` otherwise."""
    src, sep, tgt = item.partition("-") if isinstance(item, str) else ("", "", "")
    if not sep or not src or not tgt or "-" in tgt or src == tgt:
        raise ConfigError(f"{key} must name two different languages as 'src-tgt', got {item!r}")
    return src, tgt


def _entries(value: Any, key: str, data_cfg: Any) -> list[tuple[str, Pairs | None]]:
    """A ``data.<role>`` value as ``(path, pairs)`` entries: a path or a list of them, each
    serving every direction (``pairs`` None), or, in a multilingual config, a mapping
    ``{path: P, pairs: [en-de, de-en]}`` that serves only the directions it lists (corpora
    that are not aligned across all languages, or synthetic data for some directions)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) or _is_mapping(value) else _as_list(value, key)
    entries: list[tuple[str, Pairs | None]] = []
    for i, item in enumerate(items):
        where = key if isinstance(value, str) or _is_mapping(value) else f"{key}[{i}]"
        if isinstance(item, str) and item:
            entries.append((item, None))
            continue
        if not _is_mapping(item):
            raise ConfigError(
                f"{where} must be a path or a {{path: P, pairs: [src-tgt, ...]}} mapping, "
                f"got {item!r}"
            )
        unknown = sorted(set(item) - {"path", "pairs"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a corpus has path, pairs)")
        path = item.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.path must be a path, got {path!r}")
        if not is_multilingual(data_cfg):
            raise ConfigError(f"{where}.pairs needs a multilingual config (data.pairs)")
        listed = item.get("pairs")
        if isinstance(listed, str) or not listed:
            raise ConfigError(f"{where}.pairs must be a non-empty list of 'src-tgt' directions")
        pairs = tuple(_parse_pair(p, f"{where}.pairs[{j}]") for j, p in enumerate(listed))
        entries.append((path, pairs))
    return entries


def _is_mapping(value: Any) -> bool:
    return hasattr(value, "keys") and hasattr(value, "get")


def _as_list(value: Any, key: str) -> list[Any]:
    try:
        return list(value)
    except TypeError:
        raise ConfigError(f"{key} must be a path or a list of paths, got {value!r}") from None


def language_pairs(data_cfg: Any) -> list[tuple[str, str]]:
    """The translation directions of a ``data`` config: ``data.pairs`` (``["en-de", ...]``,
    a multilingual model) or else the one pair ``data.src_lang`` → ``data.tgt_lang``; a config
    or a checkpoint's plain dict."""
    value = data_cfg.get("pairs") or []
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"data.pairs must be a list of 'src-tgt' strings, got {value!r}")
    if not value:
        return [(str(data_cfg.get("src_lang")), str(data_cfg.get("tgt_lang")))]
    pairs = []
    for i, item in enumerate(value):
        pair = _parse_pair(item, f"data.pairs[{i}]")
        if pair in pairs:
            raise ConfigError(f"data.pairs[{i}]: {item} is listed twice")
        pairs.append(pair)
    return pairs


def is_multilingual(data_cfg: Any) -> bool:
    """Whether the config lists language pairs (``data.pairs``): sources carry a target tag."""
    return bool(data_cfg.get("pairs"))


def target_tags(data_cfg: Any) -> list[str]:
    """The target-language tags of a multilingual config (``<2de>``, ...), one per target
    language in first-seen order; none for a bilingual one."""
    if not is_multilingual(data_cfg):
        return []
    return list(dict.fromkeys(target_tag(tgt) for _, tgt in language_pairs(data_cfg)))


def languages(data_cfg: Any) -> list[str]:
    """Every language of the config's pairs, in first-seen order."""
    return list(dict.fromkeys(lang for pair in language_pairs(data_cfg) for lang in pair))


def corpora(
    data_cfg: Any, role: str, pairs: list[tuple[str, str]] | None = None
) -> list[ParallelCorpus]:
    """The corpora of ``role`` ("train", "valid" or "test") a ``data`` config names: each
    path once per language pair (``pairs``, default the config's), pair by pair."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    value = data_cfg.get(role)
    if value is None and data_cfg.get(f"{role}_split"):  # checkpoints of earlier versions
        value = str(Path(data_cfg.raw_dir) / data_cfg[f"{role}_split"])
    key = f"data.{role}"
    entries = _entries(value, key, data_cfg)
    if role != "test" and not entries:
        raise ConfigError(f"{key} names no corpus")
    multilingual = is_multilingual(data_cfg)
    trained = language_pairs(data_cfg)
    for path, only in entries:
        outside = [f"{s}-{t}" for s, t in only or () if (s, t) not in trained]
        if role != "test" and outside:  # a test set may be for a zero-shot direction
            raise ConfigError(f"{key}: {path} is listed for {outside[0]}, not in data.pairs")
    directions = trained if pairs is None else pairs
    out = [
        ParallelCorpus(Path(path), src, tgt, target_tag(tgt) if multilingual else None)
        for src, tgt in directions
        for path, only in entries
        if only is None or (src, tgt) in only
    ]
    if role == "train":
        for src, tgt in directions:
            if not any((c.src_lang, c.tgt_lang) == (src, tgt) for c in out):
                raise ConfigError(f"{key} names no corpus for {src}-{tgt} (data.pairs)")
    if role == "valid":
        for src, tgt in directions:
            named = [str(c.prefix) for c in out if (c.src_lang, c.tgt_lang) == (src, tgt)]
            if len(named) != 1 and not multilingual:
                raise ConfigError(f"{key} must be one path, got {len(named)}")
            if len(named) != 1:
                raise ConfigError(
                    f"{key} must name one corpus for {src}-{tgt}, got {len(named)}: {named}"
                )
    labels = [c.label for c in out]
    if role == "test" and len(set(labels)) < len(labels):  # reports name test sets by file
        raise ConfigError(f"{key}: two test sets have the same file name: {labels}")
    return out


def read_references(data_cfg: Any, role: str) -> list[tuple[str, list[str], list[str]]]:
    """``(label, sources, references)`` of each corpus of ``role`` ("valid" or "test")."""
    return [(c.label, *c.read()) for c in corpora(data_cfg, role)]


def fetch_raw(data_cfg: Any) -> None:
    """Fetch the corpus files that ``data.raw_dir`` should hold (a preset such as Multi30k
    sets ``raw_dir`` with ``shared_dir`` or ``url``); nothing to do for other corpora."""
    if not data_cfg.get("raw_dir") or not (data_cfg.get("shared_dir") or data_cfg.get("url")):
        return
    raw_dir = Path(data_cfg.raw_dir)
    names = [
        c.name for role in ROLES for c in corpora(data_cfg, role) if c.prefix.parent == raw_dir
    ]
    fetch_corpus(raw_dir, names, languages(data_cfg), data_cfg.shared_dir, data_cfg.url)
