"""One model for several directions: language pairs in the config, target-language tags on
the sources, one SentencePiece model over every language, per-direction evaluation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import WORDS, random_en_de_checkpoint, run_cli, write_gz
from test_data import data_config
from transformer_mt.cli import evaluate as evaluate_cli
from transformer_mt.cli import translate as translate_cli
from transformer_mt.cli.common import config_dir
from transformer_mt.data.corpus import ParallelCorpus, stream_chunks
from transformer_mt.data.directions import corpora, language_pairs, target_tags
from transformer_mt.data.prepare import prepare_data, prepared_name
from transformer_mt.decoding import SearchOptions, Translator
from transformer_mt.decoding.greedy import greedy_search
from transformer_mt.decoding.search import GREEDY
from transformer_mt.decoding.translator import encode_to_fit
from transformer_mt.errors import ConfigError, CorpusError, UserError
from transformer_mt.serve.app import create_app
from transformer_mt.serve.engine import torch_engine
from transformer_mt.training.config import validate_config

LANGS = {"en": str, "xx": str.upper, "yy": lambda s: " ".join(reversed(s.split()))}


def multiway_corpus(raw: Path, n_train: int = 300) -> None:
    """en, xx (upper-cased) and yy (words reversed) versions of the same sentences."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", 12), ("test_2016_flickr", 12)):
        en = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]
        for lang, fn in LANGS.items():
            write_gz(raw / f"{split}.{lang}.gz", "".join(fn(s) + "\n" for s in en).encode())


def multilingual_config(root: Path, pairs: list[str], **overrides: object) -> OmegaConf:
    multiway_corpus(root / "raw")
    cfg = data_config(root / "raw", root / "prepared", **overrides)
    cfg.src_lang, cfg.tgt_lang, cfg.pairs = "mul", "mul", pairs
    return cfg


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["en-xx", "en"], r"data.pairs\[1\] must name two different languages"),
        (["en-en"], r"data.pairs\[0\]"),
        (["en-xx", "en-xx"], r"data.pairs\[1\]: en-xx is listed twice"),
        ("en-xx", "a list of 'src-tgt' strings"),
    ],
)
def test_bad_pairs_are_config_errors_naming_the_entry(
    tmp_path: Path, pairs: object, message: str
) -> None:
    cfg = data_config(tmp_path, tmp_path)
    cfg.pairs = pairs
    with pytest.raises(ConfigError, match=message):
        language_pairs(cfg)


def test_each_path_is_one_corpus_per_direction_with_its_target_tag(tmp_path: Path) -> None:
    bilingual = data_config(tmp_path / "raw", tmp_path)
    assert language_pairs(bilingual) == [("en", "xx")] and target_tags(bilingual) == []
    [one] = corpora(bilingual, "test")
    assert (one.tag, one.label) == (None, "test_2016_flickr")  # bilingual: as before

    cfg = multilingual_config(tmp_path, ["en-xx", "en-yy", "xx-en"])
    assert target_tags(cfg) == ["<2xx>", "<2yy>", "<2en>"]
    tests = corpora(cfg, "test")
    assert [(c.src_lang, c.tgt_lang, c.tag) for c in tests] == [
        ("en", "xx", "<2xx>"),
        ("en", "yy", "<2yy>"),
        ("xx", "en", "<2en>"),
    ]
    assert [c.label for c in tests] == [
        f"test_2016_flickr.{p}" for p in ("en-xx", "en-yy", "xx-en")
    ]
    zero_shot = corpora(cfg, "valid", pairs=[("xx", "yy")])[0]
    assert (zero_shot.src_path.name, zero_shot.tgt_path.name, zero_shot.tag) == (
        "val.xx.gz",
        "val.yy.gz",
        "<2yy>",
    )


def test_the_same_text_in_two_directions_is_not_a_duplicate(tmp_path: Path) -> None:
    prefix = tmp_path / "d" / "train"
    prefix.parent.mkdir()
    Path(f"{prefix}.en").write_text("berlin\na dog\na dog\n")
    Path(f"{prefix}.xx").write_text("berlin\nA DOG\nA DOG\n")
    cfg = multilingual_config(
        tmp_path, ["en-xx", "xx-en"], **{"filter.dedup": True, "tokenizer.vocab_size": 80}
    )
    cfg.train = [str(prefix)]
    data = prepare_data(cfg)
    # "<2xx> berlin" -> "berlin" and "<2en> berlin" -> "berlin" are two examples; the
    # second "a dog" of each direction is a duplicate
    assert data.meta["train_duplicates"] == 2 and len(data.split("train")) == 4


def test_a_multilingual_length_limit_leaves_room_for_the_tag() -> None:
    overrides = ["data=multi30k_multilingual", "model.max_positions=64"]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "data.filter.max_len=63"])
    with pytest.raises(ConfigError, match=r"max_len=63 must be below model.max_positions=64 - 1"):
        validate_config(cfg, torch.device("cpu"))  # tag, 63 subwords and EOS: 65 positions
    cfg.data.filter.max_len = 62
    validate_config(cfg, torch.device("cpu"))


def test_max_train_pairs_keeps_the_first_pairs_of_each_direction(tmp_path: Path) -> None:
    for lang in ("en", "xx", "yy"):
        (tmp_path / f"a.{lang}").write_text("".join(f"a{i} {lang}\n" for i in range(5)))
        (tmp_path / f"b.{lang}").write_text("".join(f"b{i} {lang}\n" for i in range(5)))
    # Two paths per direction, read in chunks of 2 lines: the cap spans paths and chunks.
    sources = [ParallelCorpus(tmp_path / p, "en", t) for t in ("xx", "yy") for p in "ab"]

    def kept(max_pairs: int | None) -> list[tuple[str, str, int]]:
        chunks = stream_chunks(sources, max_pairs, size=2)
        return [(c.tgt_lang, c.name, src.count(b"\n")) for c, _, src, _ in chunks]

    per_direction = [("a", 2), ("a", 2), ("a", 1), ("b", 2)]  # 7 = 5 of a, then 2 of b
    assert kept(7) == [(t, *c) for t in ("xx", "yy") for c in per_direction]
    assert sum(n for *_, n in kept(None)) == 20


def test_prepared_sources_start_with_their_target_tag(tmp_path: Path) -> None:
    pairs = ["en-xx", "en-yy", "xx-en"]
    data = prepare_data(multilingual_config(tmp_path, pairs, **{"tokenizer.vocab_size": 80}))
    tok = data.tokenizer
    tags = [tok.piece_id(t) for t in ("<2xx>", "<2yy>", "<2en>")]
    assert None not in tags and len(set(tags)) == 3  # each tag is one piece of its own
    assert data.meta["sides"] == ["src", "tgt"] and data.meta["pairs"] == pairs
    train = data.split("train")
    assert len(train) == 3 * 300  # every pair of every direction (none filtered here)
    en = tmp_path / "raw" / "train.en.gz"
    en_lines = gzip.decompress(en.read_bytes()).decode().splitlines()
    for k, (tag, fn) in enumerate([(tags[0], LANGS["xx"]), (tags[1], LANGS["yy"]), (tags[2], str)]):
        src, tgt = train.pair(k * 300 + 5)  # sentence 5 of direction k
        assert src[0] == tag
        assert tok.decode([tgt.tolist()])[0] == fn(en_lines[5])
    src_text = tok.decode([train.pair(2 * 300 + 5)[0][1:].tolist()])[0]
    assert src_text == LANGS["xx"](en_lines[5])  # xx-en: the source side is the xx file
    valid = data.split("valid")
    assert len(valid) == 3 * 12 and valid.pair(12)[0][0] == tags[1]


def split_corpus(raw: Path) -> None:
    """Two corpora that are not aligned across languages: a.{en,xx} and b.{en,yy} (other
    English sentences), each with its own val set."""
    rng = np.random.default_rng(1)
    for prefix, lang in (("a", "xx"), ("b", "yy")):
        for split, n in (("train", 40 if lang == "xx" else 30), ("val", 5)):
            en = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]
            write_gz(raw / f"{prefix}_{split}.en.gz", "".join(s + "\n" for s in en).encode())
            tgt = "".join(LANGS[lang](s) + "\n" for s in en).encode()
            write_gz(raw / f"{prefix}_{split}.{lang}.gz", tgt)


def split_config(root: Path, **entries: object) -> OmegaConf:
    split_corpus(root / "raw")
    sizes = {"tokenizer.vocab_size": 80, "filter.max_ratio": 100.0}  # nothing filtered
    cfg = data_config(root / "raw", root / "prepared", **sizes)
    raw = root / "raw"
    cfg.src_lang, cfg.tgt_lang, cfg.pairs = "mul", "mul", ["en-xx", "xx-en", "en-yy"]
    cfg.train = [
        {"path": str(raw / "a_train"), "pairs": ["en-xx", "xx-en"]},
        {"path": str(raw / "b_train"), "pairs": ["en-yy"]},
    ]
    cfg.valid = [
        {"path": str(raw / "a_val"), "pairs": ["en-xx", "xx-en"]},
        {"path": str(raw / "b_val"), "pairs": ["en-yy"]},
    ]
    cfg.test = []
    for key, value in entries.items():
        cfg[key] = value
    return cfg


def test_a_corpus_may_serve_only_the_directions_it_lists(tmp_path: Path) -> None:
    cfg = split_config(tmp_path)
    train = corpora(cfg, "train")
    assert [(c.name, c.src_lang, c.tgt_lang, c.tag) for c in train] == [
        ("a_train", "en", "xx", "<2xx>"),
        ("a_train", "xx", "en", "<2en>"),
        ("b_train", "en", "yy", "<2yy>"),
    ]
    assert [c.label for c in corpora(cfg, "valid")] == ["a_val.en-xx", "a_val.xx-en", "b_val.en-yy"]
    data = prepare_data(cfg)
    assert len(data.split("train")) == 40 + 40 + 30 and len(data.split("valid")) == 3 * 5
    tok, train_split = data.tokenizer, data.split("train")
    b_en = gzip.decompress((tmp_path / "raw" / "b_train.en.gz").read_bytes()).decode()
    src, tgt = train_split.pair(80 + 7)  # sentence 7 of en-yy, the third direction
    assert src[0] == tok.piece_id("<2yy>")
    assert tok.decode([tgt.tolist()])[0] == LANGS["yy"](b_en.splitlines()[7])
    # the cache is named by what each direction reads, not by how the entries are written
    raw = tmp_path / "raw"
    regrouped = split_config(tmp_path)
    regrouped.train = [
        {"path": str(raw / "a_train"), "pairs": ["en-xx"]},
        {"path": str(raw / "b_train"), "pairs": ["en-yy"]},
        {"path": str(raw / "a_train"), "pairs": ["xx-en"]},
    ]
    assert prepared_name(regrouped) == prepared_name(cfg)
    regrouped.train[2].pairs = ["en-xx", "xx-en"]  # a_train twice for en-xx
    assert prepared_name(regrouped) != prepared_name(cfg)
    regrouped.train[1].pairs = ["en-yy", "en-xx"]  # b_train has no .xx file: named
    with pytest.raises(CorpusError, match=r"b_train\.xx"):
        prepare_data(regrouped)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"train": [{"path": "/c/a", "pairs": ["en-xx", "de-en"]}]},
            r"data.train: /c/a is listed for de-en, not in data.pairs",
        ),
        (
            {"train": [{"path": "/c/a", "pairs": ["en-xx", "xx-en"]}]},
            r"data.train names no corpus for en-yy",
        ),
        (
            {"valid": ["/c/v", {"path": "/c/w", "pairs": ["en-yy"]}]},
            r"data.valid must name one corpus for en-yy, got 2",
        ),
        (
            {"train": [{"path": "/c/a", "pairs": ["en-xx"], "langs": 1}]},
            r"data.train\[0\]: unknown key 'langs'",
        ),
        (
            {"train": [{"path": "/c/a", "pairs": ["en_xx"]}]},
            r"data.train\[0\].pairs\[0\] must name two different",
        ),
        (
            {"train": [{"path": "/c/a", "pairs": []}]},
            r"data.train\[0\].pairs must be a non-empty list",
        ),
        ({"train": [{"pairs": ["en-xx"]}]}, r"data.train\[0\].path must be a path"),
        ({"train": [3]}, r"data.train\[0\] must be a path or a \{path"),
    ],
)
def test_bad_corpus_entries_are_config_errors_naming_the_key(
    tmp_path: Path, entries: dict, message: str
) -> None:
    cfg = split_config(tmp_path, **entries)
    with pytest.raises(ConfigError, match=message):
        for role in ("train", "valid", "test"):
            corpora(cfg, role)


def test_corpus_entries_come_from_the_command_line_and_need_pairs(tmp_path: Path) -> None:
    entry = f"{{path:{tmp_path}/a_train,pairs:[en-xx,xx-en]}}"
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["data=text", "data.src_lang=mul", "data.tgt_lang=mul",
                       "data.pairs=[en-xx,xx-en]", f"data.train=[{entry}]",
                       f"data.valid={tmp_path}/a_val"],
        )  # fmt: skip
        bilingual = compose(
            "train", overrides=["data=text", "data.src_lang=en", "data.tgt_lang=xx",
                                f"data.train=[{entry}]", f"data.valid={tmp_path}/a_val"],
        )  # fmt: skip
    assert [(c.name, c.src_lang, c.tgt_lang) for c in corpora(cfg.data, "train")] == [
        ("a_train", "en", "xx"),
        ("a_train", "xx", "en"),
    ]
    with pytest.raises(ConfigError, match=r"data.train\[0\].pairs needs a multilingual config"):
        corpora(bilingual.data, "train")
    # a test set may name a direction that is not trained, for tmt-evaluate --pairs
    cfg.data.test = [{"path": f"{tmp_path}/t", "pairs": ["en-yy"]}]
    assert corpora(cfg.data, "test") == []
    assert [c.label for c in corpora(cfg.data, "test", pairs=[("en", "yy")])] == ["t.en-yy"]


PAIRS = ["en-xx", "xx-en", "en-yy"]


@pytest.fixture(scope="module")
def multilingual_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on three directions, with the final evaluation; its run dir."""
    root = tmp_path_factory.mktemp("multilingual")
    multiway_corpus(root / "raw", n_train=200)
    run_dir = root / "run"
    train = run_cli(
        "tmt-train",
        "model=tiny",
        "data.corpus=synthetic",
        "data.src_lang=mul",
        "data.tgt_lang=mul",
        f"data.pairs=[{','.join(PAIRS)}]",
        f"data.raw_dir={root / 'raw'}",
        "data.shared_dir=null",
        "data.url=null",
        f"data.prepared_dir={root / 'prepared'}",
        "data.tokenizer.vocab_size=70",
        "trainer.max_tokens=512",
        "trainer.max_steps=40",
        "trainer.valid_max_sentences=4",
        "trainer.final_beam_size=2",
        "trainer.final_alpha=[0.6,1.0]",
        "trainer.average_last=null",
        "trainer.device=cpu",
        f"hydra.run.dir={run_dir}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(train.stdout)
    return run_dir


def test_training_evaluates_every_direction(multilingual_run: Path) -> None:
    # Each validation line: "... BLEU 1.23 (mean of val.en-xx 0.50, val.xx-en 2.00, ...)"
    stdout = (multilingual_run / "stdout.txt").read_text().splitlines()
    line = [x for x in stdout if "val loss" in x][-1]
    logged = [item.rsplit(" ", 1)[0] for item in line.split("(mean of ")[1][:-1].split(", ")]
    assert logged == [f"val.{p}" for p in PAIRS]
    for name in [*(f"val.{p}" for p in PAIRS), *(f"test_2016_flickr.{p}" for p in PAIRS)]:
        assert any(x.startswith(f"  {name} (beam 2") and "nrefs:1" in x for x in stdout), name
    results = json.loads((multilingual_run / "results.json").read_text())
    final = results["checkpoints"][results["final"]]
    assert sorted(final["test"]) == sorted(f"test_2016_flickr.{p}" for p in PAIRS)
    assert sorted(final["valid_sets"]) == sorted(f"val.{p}" for p in PAIRS)
    mean = sum(s["bleu"] for s in final["valid_sets"].values()) / 3
    assert final["valid"]["bleu"] == pytest.approx(mean)  # α is chosen on the mean
    assert final["valid"]["signature"].startswith("mean of 3 sets|nrefs:1")


def test_the_tag_asks_for_the_target_language(multilingual_run: Path) -> None:
    translator = Translator.from_checkpoint(multilingual_run / "checkpoints" / "final.pt")
    tok = translator.tokenizer
    assert translator.source_prefix("yy") == [tok.piece_id("<2yy>")]
    ids = encode_to_fit(tok, ["a dog", ""], 64, prefix=translator.source_prefix("xx"))
    assert ids[0] == [tok.piece_id("<2xx>"), *tok.encode(["a dog"])[0]] and ids[1] == []
    with pytest.raises(UserError, match=r"no target language: .* translates into xx, en, yy"):
        translator.translate(["a dog"])
    with pytest.raises(UserError, match="target language 'zz'"):
        translator.translate(["a dog"], tgt_lang="zz")
    # A model built in memory (training's validation: no config) reads the same tags.
    bare = Translator(translator.model, tok, translator.device)
    assert (
        bare.source_prefix("yy") == translator.source_prefix("yy")
        and bare.source_prefix(None) == []
    )
    with pytest.raises(UserError, match="target language 'zz'"):
        bare.translate(["a dog"], tgt_lang="zz")
    # What the model reads: the tag, then the sentence and EOS.
    greedy = SearchOptions(beam_size=1)
    for lang in ("xx", "yy", "en"):
        ids = [*translator.source_prefix(lang), *tok.encode(["a red ball"])[0], tok.eos_id]
        direct = greedy_search(translator.model, torch.tensor([ids]), tok.bos_id, tok.eos_id)
        by_lang = translator.translate_ids(["a red ball"], greedy, tgt_lang=lang)
        assert by_lang[0][0].tokens == direct[0]


def test_evaluate_scores_directions_zero_shot_and_pivot(multilingual_run: Path) -> None:
    final = multilingual_run / "checkpoints" / "final.pt"
    every = run_cli("tmt-evaluate", str(final), "--split", "test", "--beam", "2", "--json")
    assert every.returncode == 0, every.stderr
    rows = [json.loads(line) for line in every.stdout.splitlines()]
    assert [r["split"] for r in rows] == [f"test_2016_flickr.{p}" for p in PAIRS]
    assert all(r["signature"].startswith("nrefs:1") for r in rows)
    assert Path(rows[1]["hypotheses"]).name.endswith(".en")  # xx-en: English hypotheses
    zero = run_cli("tmt-evaluate", str(final), "--split", "test", "--pairs", "xx-yy", "--json")
    assert zero.returncode == 0, zero.stderr
    assert json.loads(zero.stdout)["split"] == "test_2016_flickr.xx-yy"
    pivot = run_cli(
        "tmt-evaluate", str(final), "--split", "test", "--pairs", "xx-yy", "--pivot", "en", "--json"
    )
    assert pivot.returncode == 0, pivot.stderr
    assert json.loads(pivot.stdout)["split"] == "test_2016_flickr.xx-yy.via-en"
    bad = run_cli("tmt-evaluate", str(final), "--pairs", "xx")
    assert bad.returncode != 0 and "--pairs: 'xx'" in bad.stderr


def test_translate_and_serve_take_the_target_language(multilingual_run: Path) -> None:
    final = multilingual_run / "checkpoints" / "final.pt"
    lines = ["a dog runs", "the red ball"]
    out = run_cli("tmt-translate", str(final), "--tgt-lang", "yy", stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    translator = Translator.from_checkpoint(final)
    search = translator.search_options()
    assert out.stdout.splitlines() == translator.translate(lines, search, tgt_lang="yy")
    missing = run_cli("tmt-translate", str(final), stdin="a dog\n")
    assert missing.returncode != 0 and "--tgt-lang" in missing.stderr
    with TestClient(create_app(torch_engine(translator, search))) as client:
        health = client.get("/health").json()
        assert health["multilingual"] and health["pairs"] == PAIRS
        body = {"q": lines, "source": "auto", "target": "yy"}
        answer = client.post("/translate", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["translatedText"] == out.stdout.splitlines()
        v1 = client.post("/v1/translate", json={"inputs": lines[:1], "target": "xx"}).json()
        assert (
            v1["outputs"][0][0]["text"] == translator.translate(lines[:1], search, tgt_lang="xx")[0]
        )
        no_target = client.post("/v1/translate", json={"inputs": lines})
        assert no_target.status_code == 400 and "multilingual" in no_target.json()["error"]
        wrong = client.post("/translate", json={"q": "a", "source": "en", "target": "zz"})
        assert wrong.status_code == 400 and "en→xx, xx→en, en→yy" in wrong.json()["error"]
        attention = client.post("/v1/attention", json={"input": "a dog", "target": "yy"}).json()
        assert attention["source_tokens"][0] == "<2yy>"


def test_the_ctranslate2_export_takes_the_target_language(
    multilingual_run: Path, tmp_path: Path
) -> None:
    from transformer_mt.export.ctranslate2 import export_ctranslate2
    from transformer_mt.export.ctranslate2_engine import CTranslate2Translator

    final = multilingual_run / "checkpoints" / "final.pt"
    ct2 = CTranslate2Translator.from_dir(export_ctranslate2(final, tmp_path / "ct2"))
    translator = Translator.from_checkpoint(final)
    lines = ["a dog runs", "the red ball on the street", "a child sits", "the cat with a man"]
    greedy = SearchOptions(beam_size=1)
    seen = set()
    for lang in ("xx", "en", "yy"):  # greedy search: the same tokens as ours
        expected = translator.translate(lines, greedy, tgt_lang=lang)
        assert ct2.translate(lines, greedy, tgt_lang=lang) == expected
        seen.add(tuple(expected))
    assert len(seen) == 3  # the tag changes the output: CTranslate2 reads it too
    with pytest.raises(UserError, match="no target language"):
        ct2.translate(lines, greedy)


def test_evaluate_scores_a_file_in_the_target_language_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    multilingual = random_en_de_checkpoint(tmp_path / "mul.pt", pairs=["en-de", "de-en"])
    bilingual = random_en_de_checkpoint(tmp_path / "en-de.pt")
    src, ref = tmp_path / "my.en", tmp_path / "my.de"
    src.write_text("a dog runs\nthe red ball\n")
    ref.write_text("ein Hund rennt\nder rote Ball\n")
    common = ["--src", str(src), "--ref", str(ref), "--greedy", "--device", "cpu", "--json"]
    evaluate_cli.main([str(multilingual), *common, "--tgt-lang", "de"])
    row = json.loads(capsys.readouterr().out)
    translator = Translator.from_checkpoint(multilingual)
    expected = translator.translate(src.read_text().splitlines(), GREEDY, tgt_lang="de")
    assert Path(row["hypotheses"]).read_text().splitlines() == expected
    assert row["hypotheses"].endswith(".beam1.de")
    with pytest.raises(SystemExit) as exit_info:  # which language? as tmt-translate asks
        evaluate_cli.main([str(multilingual), *common])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "no target language: this multilingual model translates into de, en" in err
    assert "tmt-evaluate --tgt-lang" in err
    evaluate_cli.main([str(bilingual), *common, "--tgt-lang", "de"])  # its own target
    assert json.loads(capsys.readouterr().out)["n_sentences"] == 2
    given = ["--input", str(src), "--device", "cpu"]
    for main, flags in ((evaluate_cli.main, common), (translate_cli.main, given)):
        with pytest.raises(SystemExit) as exit_info:  # another target: the same error
            main([str(bilingual), *flags, "--tgt-lang", "fr"])
        assert exit_info.value.code == 1
        assert "error: this model translates into de, not fr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a split is scored in its own directions
        evaluate_cli.parse_args([str(multilingual), "--split", "test", "--tgt-lang", "de"])
    assert exit_info.value.code == 2
    assert "--tgt-lang goes with --src/--ref" in capsys.readouterr().err


def test_truncation_warnings_count_the_language_tag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 24 positions: EOS and the <2de> tag leave 22 subwords of a source.
    multilingual = random_en_de_checkpoint(tmp_path / "mul.pt", pairs=["en-de", "de-en"])
    translator = Translator.from_checkpoint(multilingual)
    words = " ".join(WORDS * 3)
    n = len(translator.tokenizer.encode([words])[0])
    assert n > 22
    source = tmp_path / "in.en"
    source.write_text("a dog runs\n" + words + "\n")
    translate_cli.main([str(multilingual), "--greedy", "--tgt-lang", "de", "--input", str(source)])
    err = capsys.readouterr().err
    assert f"{source}:2: {n} subwords, more than the model's 22; truncated" in err
