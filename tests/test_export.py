"""CTranslate2 export: the exported model gives the same log-probabilities and translations
as the PyTorch model, and the export directory is written safely."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import WORDS, random_en_de_checkpoint, small_transformer
from transformer_mt.cli import export as export_cli
from transformer_mt.cli import serve as serve_cli
from transformer_mt.cli import translate as translate_cli
from transformer_mt.data.batching import pad
from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
from transformer_mt.decoding import SearchOptions, Translator
from transformer_mt.errors import UserError
from transformer_mt.export.ctranslate2 import export_ctranslate2
from transformer_mt.export.ctranslate2_engine import CTranslate2Translator
from transformer_mt.formats.checkpoint import save_checkpoint, spm_bytes_to_tensor
from transformer_mt.formats.results import CheckpointResult, RunResults, Score
from transformer_mt.model import Transformer
from transformer_mt.serve.app import Limits, create_app
from transformer_mt.serve.engine import ctranslate2_engine

MODEL_CFG = dict(
    d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, max_positions=40
)


def sentences(n: int, seed: int, max_words: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = sentences(400, seed=0)
    return Tokenizer(train_sentencepiece(text + [t.upper() for t in text], 80, "unigram", 1.0))


def make_model(tokenizer: Tokenizer, **overrides: object) -> tuple[Transformer, dict]:
    """A seeded model and its ``model`` config section (build_model's keyword arguments)."""
    cfg = {**MODEL_CFG, "dropout": 0.0, "norm_first": True, **overrides}
    return small_transformer(vocab_size=tokenizer.vocab_size, **cfg), cfg


def train_to_uppercase(model: Transformer, tokenizer: Tokenizer, steps: int) -> None:
    """A few Adam steps on "copy the sentence in upper case": enough for varied outputs."""
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    text = sentences(400, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [text[i] for i in rng.integers(0, len(text), 32)]
        src = pad([[*s, tokenizer.eos_id] for s in tokenizer.encode(batch)], tokenizer.pad_id)
        tgt = tokenizer.encode([s.upper() for s in batch])
        tgt_in = pad([[tokenizer.bos_id, *t] for t in tgt], tokenizer.pad_id)
        tgt_out = pad([[*t, tokenizer.eos_id] for t in tgt], tokenizer.pad_id)
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tgt_out.flatten(), ignore_index=tokenizer.pad_id
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def save(path: Path, model: Transformer, cfg: dict, tokenizer: Tokenizer) -> Path:
    state = {
        "model": model.state_dict(),
        "config": {"model": cfg, "data": {"src_lang": "en", "tgt_lang": "xx"}},
        "spm_model": spm_bytes_to_tensor(tokenizer.model_bytes),
        "step": 123,
        "epoch": 1,
    }
    save_checkpoint(path, state)
    return path


@dataclass
class Exported:
    checkpoint: Path
    directory: Path
    reference: Translator
    ct2: CTranslate2Translator


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Exported:
    """A briefly trained pre-norm model, its checkpoint, and its CTranslate2 export."""
    tmp = tmp_path_factory.mktemp("export")
    model, cfg = make_model(tokenizer)
    train_to_uppercase(model, tokenizer, steps=200)
    ckpt = save(tmp / "model.pt", model, cfg, tokenizer)
    directory = export_ctranslate2(ckpt, tmp / "ct2")
    return Exported(
        ckpt,
        directory,
        Translator.from_checkpoint(ckpt),
        CTranslate2Translator.from_dir(directory, intra_threads=1),
    )


def agreement(exported: Exported, options: SearchOptions, lines: list[str]) -> float:
    ours = exported.reference.translate(lines, options)
    theirs = exported.ct2.translate(lines, options)
    assert len(set(ours)) > 50  # real, varied translations
    rate = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(lines)
    print(f"{options}: CTranslate2 agrees on {rate:.0%} of {len(lines)} sentences")
    return rate


@pytest.mark.parametrize(
    "options",
    [
        SearchOptions(beam_size=1),
        SearchOptions(beam_size=4, alpha=0.6),
        SearchOptions(beam_size=4, alpha=0.0),
        SearchOptions(beam_size=1, max_len_a=0.5, max_len_b=2, min_len=4),  # budget-bound
        SearchOptions(beam_size=1, no_repeat_ngram=2),
    ],
    ids=["greedy", "beam4", "beam4-alpha0", "greedy-short-budget", "greedy-no-repeat"],
)
def test_translations_agree_with_pytorch(exported: Exported, options: SearchOptions) -> None:
    lines = sentences(100, seed=1, max_words=15)
    assert agreement(exported, options, lines) >= 0.98


def test_nbest_scores_equal_beam_search_scores(exported: Exported) -> None:
    options = SearchOptions(beam_size=4, alpha=0.6, nbest=3)
    lines = sentences(20, seed=3)
    ours = exported.reference.translate_ids(lines, options)
    theirs = exported.ct2.translate_nbest(lines, options)
    compared = 0
    for hyps, nbest in zip(ours, theirs, strict=True):
        assert len(nbest) == 3
        assert [s for _, s in nbest] == sorted((s for _, s in nbest), reverse=True)
        texts = exported.reference.tokenizer.decode([h.tokens for h in hyps])
        for text, h, (ct2_text, ct2_score) in zip(texts, hyps, nbest, strict=True):
            if text == ct2_text:
                assert ct2_score == pytest.approx(h.score, abs=1e-3)
                compared += 1
    assert compared >= 55


@pytest.mark.parametrize("norm_first, activation", [(True, "relu"), (False, "gelu")])
def test_token_log_probs_match_pytorch(
    tmp_path: Path, tokenizer: Tokenizer, norm_first: bool, activation: str
) -> None:
    """Teacher-forced log-probabilities of random (untrained) pre- and post-norm models."""
    model, cfg = make_model(tokenizer, norm_first=norm_first, activation=activation)
    ct2 = CTranslate2Translator.from_dir(
        export_ctranslate2(save(tmp_path / "m.pt", model, cfg, tokenizer), tmp_path / "ct2"),
        intra_threads=1,
    )
    src_ids = tokenizer.encode(sentences(8, seed=4))
    tgt_ids = tokenizer.encode([s.upper() for s in sentences(8, seed=5)])
    scored = ct2.translator.score_batch(
        [[ct2.pieces[t] for t in s] for s in src_ids],
        [[ct2.pieces[t] for t in ids] for ids in tgt_ids],
    )
    with torch.no_grad():
        src = pad([[*s, tokenizer.eos_id] for s in src_ids], tokenizer.pad_id)
        tgt_in = pad([[tokenizer.bos_id, *t] for t in tgt_ids], tokenizer.pad_id)
        log_probs = torch.log_softmax(model(src, tgt_in), dim=-1)
    for row, (tgt, result) in enumerate(zip(tgt_ids, scored, strict=True)):
        expected = [log_probs[row, i, t].item() for i, t in enumerate([*tgt, tokenizer.eos_id])]
        np.testing.assert_allclose(result.log_probs, expected, atol=1e-4)


def test_empty_and_truncated_inputs(exported: Exported) -> None:
    long = " ".join(["the red ball"] * 30)  # more subwords than max_positions 40
    lines = ["", "a dog runs", "   ", long]
    for options in (SearchOptions(beam_size=1), SearchOptions(beam_size=3)):
        out = exported.ct2.translate(lines, options)
        assert out[0] == "" and out[2] == ""
        assert out == exported.reference.translate(lines, options)
    assert exported.ct2.translate_nbest([""], SearchOptions(beam_size=2, nbest=2)) == [[("", 0.0)]]


def test_export_directory_contents(exported: Exported) -> None:
    names = {p.name for p in exported.directory.iterdir()}
    assert {"model.bin", "config.json", "shared_vocabulary.json", "spm.model"} <= names
    assert (exported.directory / "spm.model").read_bytes() == exported.ct2.tokenizer.model_bytes
    meta = json.loads((exported.directory / "transformer_mt.json").read_text())
    assert meta["src_lang"] == "en" and meta["tgt_lang"] == "xx"
    assert meta["checkpoint"] == str(exported.checkpoint.resolve())
    assert meta["max_positions"] == MODEL_CFG["max_positions"]


def test_export_refuses_to_overwrite_without_force(exported: Exported, tmp_path: Path) -> None:
    out = tmp_path / "ct2"
    export_ctranslate2(exported.checkpoint, out)
    fp32_bytes = (out / "model.bin").stat().st_size
    with pytest.raises(UserError, match="not empty; pass --force"):
        export_ctranslate2(exported.checkpoint, out)
    (out / "stale.txt").write_text("old")
    export_ctranslate2(exported.checkpoint, out, quantization="int8", force=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "transformer_mt.json").read_text())["quantization"] == "int8"
    assert (out / "model.bin").stat().st_size < 0.5 * fp32_bytes  # the weights are int8 now
    [translation] = CTranslate2Translator.from_dir(out).translate(
        ["a dog"], SearchOptions(beam_size=1)
    )
    assert isinstance(translation, str)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]  # no temporary leftovers
    precious = tmp_path / "run"
    (precious / "checkpoints").mkdir(parents=True)
    (precious / "checkpoints" / "best.pt").write_bytes(b"weights")
    with pytest.raises(UserError, match="not a tmt-export directory"):
        export_ctranslate2(exported.checkpoint, precious, force=True)
    assert (precious / "checkpoints" / "best.pt").read_bytes() == b"weights"  # untouched


def test_an_export_removes_what_a_killed_export_left(exported: Exported, tmp_path: Path) -> None:
    out = tmp_path / "ct2"
    export_ctranslate2(exported.checkpoint, out)
    for left in (".ct2.abc123.tmp", ".ct2.def456.old"):  # a kill mid-write, mid-swap
        (tmp_path / left / "dir").mkdir(parents=True)
    export_ctranslate2(exported.checkpoint, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]  # and no lock file left


def test_failed_export_leaves_nothing(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(new: Path, target: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("transformer_mt.formats.atomic._replace_dir", fail)
    with pytest.raises(OSError, match="disk full"):
        export_ctranslate2(exported.checkpoint, tmp_path / "ct2")
    assert list(tmp_path.iterdir()) == []


def test_cli(exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    export_cli.main([str(exported.checkpoint), "--format", "ctranslate2", str(out)])
    assert "spm.model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(exported.checkpoint), str(out), "--quantization", "int8"])
    assert exit_info.value.code == 1
    assert "pass --force" in capsys.readouterr().err
    fp32_bytes = (out / "model.bin").stat().st_size
    export_cli.main([str(exported.checkpoint), str(out), "--quantization", "int8", "--force"])
    assert "int8" in capsys.readouterr().out
    assert (out / "model.bin").stat().st_size < 0.5 * fp32_bytes


@pytest.fixture(scope="module")
def untrained_export(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The export of a random model (max_positions 40): for what does not need translations."""
    tmp = tmp_path_factory.mktemp("untrained")
    model, cfg = make_model(tokenizer)
    return export_ctranslate2(save(tmp / "model.pt", model, cfg, tokenizer), tmp / "ct2")


DAMAGED_EXPORTS = {
    "truncated_json": ("transformer_mt.json", lambda text: text[: len(text) // 2]),
    "not_an_object": ("transformer_mt.json", lambda text: "[1, 2]"),
    "no_max_positions": (
        "transformer_mt.json",
        lambda text: json.dumps(
            {k: v for k, v in json.loads(text).items() if k != "max_positions"}
        ),
    ),
    "bad_max_positions": (
        "transformer_mt.json",
        lambda text: json.dumps({**json.loads(text), "max_positions": "forty"}),
    ),
    "bad_pairs": ("transformer_mt.json", lambda text: json.dumps({**json.loads(text), "pairs": 5})),
    "tuned_alpha_not_by_beam": (
        "transformer_mt.json",
        lambda text: json.dumps({**json.loads(text), "tuned_alpha": {"five": 1.0}}),
    ),
    "negative_tuned_alpha": (
        "transformer_mt.json",
        lambda text: json.dumps({**json.loads(text), "tuned_alpha": {"5": -1}}),
    ),
    "bad_spm_model": ("spm.model", lambda text: "not a sentencepiece model"),
}


def test_a_checkpoint_ctranslate2_cannot_represent_is_refused_before_writing(
    tmp_path: Path,
) -> None:
    state = torch.load(random_en_de_checkpoint(tmp_path / "ok.pt"), weights_only=True)
    no_encoder = {**state, "config": {**state["config"]}}
    no_encoder["config"]["model"] = {**state["config"]["model"], "n_encoder_layers": 0}
    no_encoder["model"] = {
        k: v for k, v in state["model"].items() if not k.startswith("encoder.layers.")
    }
    torch.save(no_encoder, tmp_path / "no_encoder.pt")
    with pytest.raises(UserError, match=r"model\.n_encoder_layers=0: CTranslate2 needs"):
        export_ctranslate2(tmp_path / "no_encoder.pt", tmp_path / "ct2")
    bad_pairs = {**state, "config": {**state["config"]}}
    bad_pairs["config"]["data"] = {**state["config"]["data"], "pairs": "en-de"}  # not a list
    torch.save(bad_pairs, tmp_path / "bad_pairs.pt")
    with pytest.raises(UserError, match=r"data\.pairs"):
        export_ctranslate2(tmp_path / "bad_pairs.pt", tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()


@pytest.mark.parametrize("damage", DAMAGED_EXPORTS)
def test_a_damaged_export_is_a_user_error_naming_the_file(
    untrained_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    name, change = DAMAGED_EXPORTS[damage]
    directory = tmp_path / "ct2"
    shutil.copytree(untrained_export, directory)
    damaged = directory / name
    damaged.write_text(change(damaged.read_text(errors="replace")))
    with pytest.raises(UserError, match=re.escape(str(damaged))):
        CTranslate2Translator.from_dir(directory)
    with pytest.raises(SystemExit) as exit_info:  # tmt-serve stops start-up the same way
        serve_cli.main([str(directory), "--engine", "ctranslate2", "--device", "cpu"])
    assert exit_info.value.code == 1 and str(damaged) in capsys.readouterr().err


def test_the_ctranslate2_server_refuses_inputs_longer_than_the_model_reads(
    untrained_export: Path,
) -> None:
    ct2 = CTranslate2Translator.from_dir(untrained_export, intra_threads=1)
    engine = ctranslate2_engine(untrained_export, ct2, SearchOptions(beam_size=2))
    fits = " ".join(["dog"] * 39)  # max_positions 40: 39 subwords and EOS
    too_long = " ".join(["dog"] * 40)
    assert [len(ids) for ids in ct2.tokenizer.encode([fits, too_long])] == [39, 40]
    with TestClient(create_app(engine, Limits(batch_timeout_ms=0))) as client:
        ok = client.post("/v1/translate", json={"inputs": [fits]})
        assert ok.status_code == 200, ok.text
        r = client.post("/v1/translate", json={"inputs": [fits, too_long]})
        assert r.status_code == 413
        assert r.json()["error"] == "inputs[1]: 40 subwords; the model reads at most 39"


class RecordingTranslator:
    """A ``ctranslate2.Translator`` that appends the keyword arguments of each of its
    ``translate_batch`` and ``score_batch`` calls to ``calls``."""

    def __init__(self, translator: Any, calls: list[dict[str, Any]]) -> None:
        self.translator, self.calls = translator, calls

    def translate_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.translator.translate_batch(*args, **kwargs)

    def score_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.translator.score_batch(*args, **kwargs)


def record_ctranslate2_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every CTranslate2 call of the exports the test loads (with
    ``CTranslate2Translator.from_dir``, as tmt-translate and tmt-serve do), as they come."""
    calls: list[dict[str, Any]] = []
    load = CTranslate2Translator.from_dir

    def from_dir(*args: Any, **kwargs: Any) -> CTranslate2Translator:
        loaded = load(*args, **kwargs)
        loaded.translator = RecordingTranslator(loaded.translator, calls)
        return loaded

    monkeypatch.setattr(CTranslate2Translator, "from_dir", from_dir)
    return calls


def test_the_ctranslate2_server_decodes_in_batches_of_batch_size_without_warnings(
    untrained_export: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = record_ctranslate2_calls(monkeypatch)
    flags = [str(untrained_export), "--engine", "ctranslate2", "--device", "cpu", "--beam", "2"]
    engine = serve_cli.load_engine(serve_cli.parse_args([*flags, "--batch-size", "3"]))
    too_long = " ".join(["dog"] * 45)  # max_positions 40: cut to 39 subwords
    lines = [*sentences(7, seed=4), too_long]
    for beam in (2, 1):  # n-best lists, then greedy search
        options = dataclasses.replace(engine.options, beam_size=beam, nbest=1)
        assert len(engine.decode(lines, options, None)) == len(lines)
    assert calls and {call["max_batch_size"] for call in calls} == {3}
    assert capsys.readouterr().err == ""  # the app refuses over-long inputs before the engine
    with pytest.raises(SystemExit) as exit_info:
        serve_cli.parse_args([*flags, "--max-tokens", "100"])
    assert exit_info.value.code == 2
    assert "--max-tokens needs --engine torch" in capsys.readouterr().err


def test_ctranslate2_truncation_warnings_name_the_line_as_the_torch_engine_does(
    untrained_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    too_long = " ".join(["dog"] * 45)
    src = tmp_path / "in.en"  # over-long lines 1 and 2,002: the second in the second chunk
    src.write_text("\n".join([too_long, *[""] * 2000, too_long, "a dog"]) + "\n")
    checkpoint = untrained_export.parent / "model.pt"
    warnings = {}
    for engine, model in (("ctranslate2", untrained_export), ("torch", checkpoint)):
        out = tmp_path / f"{engine}.xx"
        translate_cli.main(
            [str(model), "--engine", engine, "--greedy", "--device", "cpu",
             "--input", str(src), "--output", str(out)]
        )  # fmt: skip
        err = capsys.readouterr().err.splitlines()
        warnings[engine] = [line for line in err if line.startswith("warning")]
        assert len(out.read_text().splitlines()) == 2003
    expected = [
        f"warning: {src}:{n}: 45 subwords, more than the model's 39; truncated" for n in (1, 2002)
    ]
    assert warnings["ctranslate2"] == warnings["torch"] == expected


def test_an_export_is_decoded_at_the_alpha_its_run_chose_on_val(
    tmp_path: Path,
    tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model, cfg = make_model(tokenizer)
    best = save(run / "checkpoints" / "best.pt", model, cfg, tokenizer)  # step 123
    score = Score(30.0, 60.0, "nrefs:1")
    chosen = {"best.pt": CheckpointResult(123, 2, 0.7, score)}
    chosen["averaged.pt"] = CheckpointResult(123, 2, 3.0, score)  # another file's
    RunResults(steps=123, final="best.pt", checkpoints=chosen).write(run)
    export = export_ctranslate2(best, tmp_path / "ct2")
    metadata = export / "transformer_mt.json"
    assert json.loads(metadata.read_text())["tuned_alpha"] == {"2": 0.7}
    assert Translator.from_checkpoint(best).search_options(beam_size=2).alpha == 0.7  # torch's

    calls = record_ctranslate2_calls(monkeypatch)
    (tmp_path / "in.en").write_text("a dog runs\n")
    flags = [str(export), "--engine", "ctranslate2", "--device", "cpu", "--beam", "2"]
    files = ["--input", str(tmp_path / "in.en"), "--output", str(tmp_path / "out.xx")]
    for given, alpha in (([], 0.7), (["--alpha", "1.5"], 1.5)):
        calls.clear()
        translate_cli.main([*flags, *files, *given])
        assert {call["length_penalty"] for call in calls if "length_penalty" in call} == {alpha}
        tuned = "α 0.7, chosen by the checkpoint's run" in capsys.readouterr().err
        assert tuned == (not given)

    def served_alpha(*given: str) -> float:
        args = serve_cli.parse_args([*flags, *given])
        return serve_cli.load_engine(args).options.alpha

    assert served_alpha() == 0.7
    assert served_alpha("--alpha", "1.5") == 1.5
    assert served_alpha("--beam", "3") == SearchOptions.alpha  # tuned for beam 2 only
    older = json.loads(metadata.read_text())  # an export written before tuned_alpha
    del older["tuned_alpha"]
    metadata.write_text(json.dumps(older))
    assert served_alpha() == SearchOptions.alpha
    translate_cli.main([*flags, *files])
    assert "chosen by" not in capsys.readouterr().err

    metadata.write_text(json.dumps({**older, "tuned_alpha": {"5": 0.7}}))  # tuned for beam 5
    api = CTranslate2Translator.from_dir(export, intra_threads=1)
    for decode in (api.translate, api.translate_nbest):  # the Python API, given no options
        calls.clear()
        decode(["a dog runs"])
        assert {call["length_penalty"] for call in calls if "length_penalty" in call} == {0.7}
