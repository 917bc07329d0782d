"""End to end through the real console scripts, on a 2,000-pair Multi30k subset (the shared
trained run's val and test sets cut to their first EVAL_LINES lines, to keep decoding short)."""

from __future__ import annotations

import gc
import gzip
import io
import json
import os
import re
import select
import shutil
import subprocess
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from omegaconf import OmegaConf

from conftest import (
    BIN,
    random_en_de_checkpoint,
    run_cli,
    synthetic_corpus,
    write_gz,
)
from transformer_mt.cli import evaluate as evaluate_cli
from transformer_mt.cli import export as export_cli
from transformer_mt.cli import translate as translate_cli
from transformer_mt.cli.evaluate import expand_checkpoints
from transformer_mt.decoding.translator import freeze_loaded
from transformer_mt.formats.checkpoint import (
    checkpoint_step,
)
from transformer_mt.formats.results import CheckpointResult, RunResults, Score, tuned_alpha

pytestmark = pytest.mark.slow

EVAL_LINES = 150  # of val and test_2016_flickr, in the trained run's corpus
SUBSET = [
    "data.max_train_pairs=2000",
    "data.tokenizer.vocab_size=1000",
]


def data_overrides(root: Path, shared: Path | str) -> list[str]:
    return [
        f"data.raw_dir={root / 'raw'}",
        f"data.shared_dir={shared}",
        f"data.prepared_dir={root / 'prepared'}",
        "data.url=null",
        *SUBSET,
    ]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, multi30k_dir: Path) -> Path:
    """prepare -> train a few hundred steps of the tiny model; returns the run directory."""
    root = tmp_path_factory.mktemp("e2e")
    for name in ("train.en.gz", "train.de.gz"):  # the rest of the corpus is fetched as usual
        (root / "raw").mkdir(exist_ok=True)
        (root / "raw" / name).symlink_to(multi30k_dir / name)
    for split in ("val", "test_2016_flickr"):
        for lang in ("en", "de"):
            with gzip.open(multi30k_dir / f"{split}.{lang}.gz", "rb") as f:
                head = b"".join(f.readline() for _ in range(EVAL_LINES))
            write_gz(root / "raw" / f"{split}.{lang}.gz", head)
    prep = run_cli(
        "tmt-prepare", *data_overrides(root, multi30k_dir), f"hydra.run.dir={root / 'prep'}"
    )
    assert prep.returncode == 0, prep.stderr
    assert "dropped" in prep.stdout
    run_dir = root / "run"
    train = run_cli(
        "tmt-train",
        *data_overrides(root, multi30k_dir),
        "model=tiny",
        "optim.lr=3e-3",
        "optim.warmup_steps=100",
        "trainer.max_steps=300",
        "trainer.max_tokens=2048",
        "trainer.log_every=50",
        "trainer.valid_max_sentences=100",
        "trainer.final_eval=false",
        f"hydra.run.dir={run_dir}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "using prepared data" in train.stdout  # the cache from tmt-prepare is reused
    assert "model parameters:" in train.stdout
    assert f"best checkpoint: {run_dir / 'checkpoints' / 'best.pt'}" in train.stdout
    return run_dir


def test_training_writes_checkpoints_logs_and_config(trained_run: Path) -> None:
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "best.pt").is_file() and (ckpts / "last.pt").is_file()
    state = torch.load(ckpts / "last.pt", weights_only=True)
    assert state["step"] == 300
    assert state["config"]["model"]["d_model"] == 64
    assert state["spm_model"].dtype == torch.uint8 and state["spm_model"].numel() > 1000
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert "max_steps: 300" in (trained_run / "config.yaml").read_text()
    # config.yaml is the config the checkpoints record (derived values resolved).
    written = OmegaConf.to_container(OmegaConf.load(trained_run / "config.yaml"))
    assert written == state["config"]


def test_evaluate_json_on_a_file_and_on_the_test_split(
    trained_run: Path, multi30k_dir: Path, tmp_path: Path
) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    with gzip.open(multi30k_dir / "val.en.gz", "rt") as f:
        src = f.read().splitlines()[:40]
    with gzip.open(multi30k_dir / "val.de.gz", "rt") as f:
        ref = f.read().splitlines()[:40]
    (tmp_path / "small.en").write_text("\n".join(src) + "\n")
    (tmp_path / "small.de").write_text("\n".join(ref) + "\n")
    out = tmp_path / "hyps.de"
    r = run_cli(
        "tmt-evaluate",
        str(best),
        "--src",
        str(tmp_path / "small.en"),
        "--ref",
        str(tmp_path / "small.de"),
        "--beam",
        "3",
        "--json",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_sentences"] == 40
    assert 0.0 <= result["bleu"] <= 100.0 and 0.0 < result["chrf"] <= 100.0
    assert result["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert len(out.read_text().splitlines()) == 40

    r = run_cli("tmt-evaluate", str(best), "--split", "test", "--beam", "1", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_sentences"] == EVAL_LINES and result["split"] == "test_2016_flickr"
    assert len(Path(result["hypotheses"]).read_text().splitlines()) == EVAL_LINES


def test_translate_keeps_one_line_per_input_line(trained_run: Path, tmp_path: Path) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    lines = ["A man is riding a bike.", "", "Two dogs play in the snow.", "   ", "A woman sings."]
    for flags in (["--beam", "4"], ["--greedy", "--batch-size", "2"]):
        r = run_cli("tmt-translate", str(best), *flags, stdin="\n".join(lines) + "\n")
        assert r.returncode == 0, r.stderr
        out = r.stdout.split("\n")[:-1]
        assert len(out) == len(lines)
        assert out[1] == "" and out[3] == ""
        assert all(out[i] for i in (0, 2, 4))
    src = tmp_path / "in.en"
    src.write_text("\n".join(lines) + "\n")
    r = run_cli(
        "tmt-translate", str(best), "--input", str(src), "--output", str(tmp_path / "out.de")
    )
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "out.de").read_text().splitlines()) == len(lines)


def test_nbest_output_format(trained_run: Path) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    stdin = "A man is riding a bike.\n\nTwo dogs play.\n"
    r = run_cli("tmt-translate", str(best), "--beam", "4", "--nbest", "3", stdin=stdin)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert all(len(row) == 5 for row in rows)
    by_line: dict[int, list[list[str]]] = {}
    for row in rows:
        by_line.setdefault(int(row[0]), []).append(row)
    assert sorted(by_line) == [1, 2, 3]
    assert by_line[2] == [["2", "1", "0.0000", "0.0000", ""]]  # the empty line
    for n in (1, 3):
        assert [int(row[1]) for row in by_line[n]] == [1, 2, 3]
        scores = [float(row[2]) for row in by_line[n]]
        assert scores == sorted(scores, reverse=True) and all(row[4] for row in by_line[n])
    plain = run_cli("tmt-translate", str(best), "--beam", "4", stdin=stdin)
    assert plain.stdout.splitlines()[0] == by_line[1][0][4]  # rank 1 = the plain output
    bad = run_cli("tmt-translate", str(best), "--beam", "2", "--nbest", "3", stdin=stdin)
    assert bad.returncode == 2 and "nbest" in bad.stderr


def test_interactive_answers_each_line_before_the_next_is_sent(trained_run: Path) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    command = [str(BIN / "tmt-translate"), str(best), "--interactive", "--greedy"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    answers = []
    for line in (b"A dog runs.\n", b"\n", b"A woman sings.\n"):
        proc.stdin.write(line)
        proc.stdin.flush()  # the pipe stays open: the answer must come without EOF
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no answer while the input stayed open"
        answers.append(proc.stdout.readline())
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert answers[1] == b"\n" and answers[0].strip() and answers[2].strip()


def test_too_long_and_invalid_lines_keep_the_line_contract(trained_run: Path) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    long = " ".join(["A man is riding a bike."] * 80)  # > 255 subwords
    stdin = f"A dog runs.\n{long}\nTwo dogs.\n"
    r = run_cli("tmt-translate", str(best), "--greedy", stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split("\n")[:-1]) == 3
    assert "<stdin>:2:" in r.stderr and "truncated" in r.stderr
    proc = subprocess.run(
        [str(BIN / "tmt-translate"), str(best), "--greedy"],
        input=b"ok\n\xff\xfe bad\n",
        capture_output=True,
    )
    assert proc.returncode == 0 and len(proc.stdout.split(b"\n")[:-1]) == 2
    assert b"<stdin>:2: invalid UTF-8" in proc.stderr


def test_attention_maps_from_the_shell(trained_run: Path, tmp_path: Path) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    out = tmp_path / "attention"
    stdin = "A man is riding a bike.\n\nTwo dogs play.\n"
    r = run_cli("tmt-translate", str(best), "--attention-dir", str(out), stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "000001.npy",
        "000001.png",
        "000003.npy",
        "000003.png",
    ]
    weights = np.load(out / "000001.npy")
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    bad = run_cli(
        "tmt-translate",
        str(best),
        "--attention-dir",
        str(out),
        "--attention-layer",
        "9",
        stdin=stdin,
    )
    assert bad.returncode == 1 and "attention-layer 9" in bad.stderr


def test_export_to_ctranslate2_and_translate_with_it(
    trained_run: Path, multi30k_dir: Path, tmp_path: Path
) -> None:
    best, exported = trained_run / "checkpoints" / "best.pt", tmp_path / "ct2"
    r = run_cli("tmt-export", str(best), "--format", "ctranslate2", str(exported))
    assert r.returncode == 0, r.stderr
    assert (exported / "model.bin").is_file() and (exported / "spm.model").is_file()
    with gzip.open(multi30k_dir / "test_2016_flickr.en.gz", "rt") as f:
        stdin = "\n".join(f.read().splitlines()[:100]) + "\n"
    ours = run_cli("tmt-translate", str(best), "--greedy", stdin=stdin)
    theirs = run_cli(
        "tmt-translate", str(exported), "--engine", "ctranslate2", "--greedy", stdin=stdin
    )
    assert ours.returncode == 0 and theirs.returncode == 0, theirs.stderr
    a, b = ours.stdout.splitlines(), theirs.stdout.splitlines()
    assert len(a) == len(b) == 100
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 98
    again = run_cli("tmt-export", str(best), "--format", "ctranslate2", str(exported))
    assert again.returncode == 1 and "--force" in again.stderr


def test_translate_in_bf16_agrees_with_fp32_and_fp16_needs_cuda(
    trained_run: Path, multi30k_dir: Path, tmp_path: Path
) -> None:
    best, exported = trained_run / "checkpoints" / "best.pt", tmp_path / "ct2"
    with gzip.open(multi30k_dir / "test_2016_flickr.en.gz", "rt") as f:
        stdin = "\n".join(f.read().splitlines()[:100]) + "\n"
    fp32 = run_cli("tmt-translate", str(best), "--beam", "4", stdin=stdin)
    bf16 = run_cli("tmt-translate", str(best), "--beam", "4", "--precision", "bf16", stdin=stdin)
    assert fp32.returncode == 0 and bf16.returncode == 0, bf16.stderr
    a, b = fp32.stdout.splitlines(), bf16.stdout.splitlines()
    assert len(a) == len(b) == 100
    # rounding flips close choices of this barely trained model in some sentences (74 of 100
    # when written), and a flip changes the rest of the sentence, but most words stay
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 60
    assert sacrebleu.corpus_bleu(b, [a]).score >= 80  # 90 when written
    if torch.cuda.is_available():
        return
    fp16 = run_cli("tmt-translate", str(best), "--precision", "fp16", stdin=stdin)
    assert fp16.returncode == 1 and "fp16 needs a CUDA device" in fp16.stderr
    assert not fp16.stdout
    r = run_cli("tmt-export", str(best), "--format", "ctranslate2", str(exported))
    assert r.returncode == 0, r.stderr
    flags = ["--engine", "ctranslate2", "--greedy", "--precision"]
    ct2 = run_cli("tmt-translate", str(exported), *flags, "fp16", stdin=stdin)
    assert ct2.returncode == 1 and "float16" in ct2.stderr, ct2.stderr
    ct2 = run_cli("tmt-translate", str(exported), *flags, "fp32", stdin=stdin)
    assert ct2.returncode == 0 and len(ct2.stdout.splitlines()) == 100, ct2.stderr


def test_evaluate_many_checkpoints_with_more_metrics(trained_run: Path, tmp_path: Path) -> None:
    src, ref = tmp_path / "s.en", tmp_path / "s.de"
    src.write_text("A man is riding a bike.\nTwo dogs play in the snow.\n")
    ref.write_text("Ein Mann fährt Fahrrad.\nZwei Hunde spielen im Schnee.\n")
    steps = sorted((trained_run / "checkpoints").glob("checkpoint_*.pt"))
    flags = ["--src", str(src), "--ref", str(ref), "--beam", "2", "--metrics", "bleu,chrf,ter"]
    r = run_cli("tmt-evaluate", str(trained_run), *flags)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["checkpoint", "set", "step", "α", "BLEU", "CHRF", "TER"]
    assert [line.split()[0] for line in lines[1 : 1 + len(steps)]] == [str(p) for p in steps]
    assert any(line.startswith("ter signature: nrefs:1") for line in lines)
    greedy = run_cli("tmt-evaluate", str(steps[0]), *flags[:4], "--greedy").stdout.splitlines()
    assert greedy[1].split()[1:4] == ["s", str(checkpoint_step(steps[0])), "–"]  # no α: greedy
    r = run_cli("tmt-evaluate", str(steps[0]), str(steps[-1]), *flags, "--json")
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["checkpoint"] for x in results] == [str(steps[0]), str(steps[-1])]
    assert all({"bleu", "chrf", "ter", "signatures"} <= set(x) for x in results)
    assert all(Path(x["hypotheses"]).is_file() for x in results)
    bad = run_cli("tmt-evaluate", str(steps[0]), *flags[:4], "--metrics", "bleu,meteor")
    assert bad.returncode == 2 and "meteor" in bad.stderr


def run_results(alphas: dict[str, float], step: int = 300, beam_size: int = 5) -> dict:
    """A results.json (as a dict) whose final evaluation chose ``alphas[name]`` for each file."""
    evaluated = {
        name: CheckpointResult(step, beam_size, alpha, Score(30.0, 60.0, "nrefs:1"))
        for name, alpha in alphas.items()
    }
    return asdict(RunResults(steps=step, final=next(iter(alphas)), checkpoints=evaluated))


def test_tuned_alpha_is_the_one_the_runs_results_name_for_that_file_and_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("checkpoint_200.pt", "checkpoint_300.pt", "averaged.pt"):
        (ckpts / name).write_bytes(name.encode())
    os.link(ckpts / "checkpoint_300.pt", ckpts / "best.pt")  # as CheckpointManager links it
    shutil.copy(ckpts / "best.pt", ckpts / "copy.pt")
    assert tuned_alpha(ckpts / "best.pt", 300, 5) is None  # no results.json yet
    results_file = tmp_path / "run" / "results.json"
    results = run_results({"best.pt": 1.4, "averaged.pt": 3})
    results_file.write_text(json.dumps(results))
    assert tuned_alpha(ckpts / "best.pt", 300, 5) == 1.4
    assert tuned_alpha(ckpts / "checkpoint_300.pt", 300, 5) == 1.4  # the same file as best.pt
    assert tuned_alpha(ckpts / "averaged.pt", 300, 5) == 3.0
    monkeypatch.chdir(ckpts)
    assert tuned_alpha(Path("best.pt"), 300, 5) == 1.4  # a relative path finds the run too
    assert tuned_alpha(ckpts / "copy.pt", 300, 5) is None  # another file, whatever its bytes
    assert tuned_alpha(ckpts / "checkpoint_200.pt", 200, 5) is None  # not evaluated at the end
    assert tuned_alpha(ckpts / "best.pt", 400, 5) is None  # best.pt changed after results.json
    assert tuned_alpha(ckpts / "best.pt", None, 5) is None  # step unknown
    assert tuned_alpha(ckpts / "best.pt", 300, 10) is None  # tuned for another beam size
    assert tuned_alpha(ckpts / "best.pt", 300, 1) is None  # greedy has no length penalty
    newer = results_file.stat().st_mtime_ns + 10**9
    os.utime(ckpts / "averaged.pt", ns=(newer, newer))  # e.g. rewritten by tmt-average
    assert tuned_alpha(ckpts / "averaged.pt", 300, 5) is None
    best_entry = results["checkpoints"]["best.pt"]
    for bad_alpha in (None, "1", -1, float("nan"), True):
        bad = {**results, "checkpoints": {"best.pt": {**best_entry, "alpha": bad_alpha}}}
        results_file.write_text(json.dumps(bad))
        assert tuned_alpha(ckpts / "best.pt", 300, 5) is None
    results_file.write_text(json.dumps([1, 2]))
    assert tuned_alpha(ckpts / "best.pt", 300, 5) is None
    results_file.write_text("{not json")
    assert tuned_alpha(ckpts / "best.pt", 300, 5) is None


def test_a_run_directory_expands_to_its_checkpoints_and_named_files_stay_named(
    tmp_path: Path,
) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("checkpoint_0000020.pt", "checkpoint_0000010.pt", "averaged.pt"):
        (ckpts / name).write_bytes(name.encode())
    os.link(ckpts / "checkpoint_0000020.pt", ckpts / "best.pt")  # duplicates: left out
    os.link(ckpts / "checkpoint_0000020.pt", ckpts / "last.pt")
    os.link(ckpts / "averaged.pt", ckpts / "final.pt")  # scored once, as averaged.pt
    other = tmp_path / "other.pt"
    other.write_bytes(b"x")
    assert expand_checkpoints([tmp_path / "run", other, ckpts / "best.pt"]) == [
        (ckpts / "checkpoint_0000010.pt", False),
        (ckpts / "checkpoint_0000020.pt", False),
        (ckpts / "averaged.pt", False),
        (other, True),
        (ckpts / "best.pt", True),
    ]


def test_evaluate_and_translate_use_the_runs_tuned_alpha_unless_given(
    trained_run: Path, tmp_path: Path
) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    best = ckpts / "best.pt"
    shutil.copy(trained_run / "checkpoints" / "best.pt", best)
    step = torch.load(best, weights_only=True)["step"]
    results = run_results({"best.pt": 0.7}, step=step, beam_size=2)
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    src, ref = tmp_path / "s.en", tmp_path / "s.de"
    src.write_text("A man is riding a bike.\nTwo dogs play in the snow.\n")
    ref.write_text("Ein Mann fährt Fahrrad.\nZwei Hunde spielen im Schnee.\n")
    flags = ["--src", str(src), "--ref", str(ref), "--beam", "2", "--json"]
    r = run_cli("tmt-evaluate", str(best), *flags)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["alpha"] == 0.7
    assert re.search(r"\.s-[0-9a-f]{8}\.beam2-alpha0\.7\.de$", result["hypotheses"])
    r = run_cli("tmt-evaluate", str(best), *flags, "--alpha", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["alpha"] == 2.0
    r = run_cli("tmt-evaluate", str(best), *flags, "--beam", "3")
    assert json.loads(r.stdout.splitlines()[-1])["alpha"] == 2.2  # tuned for beam 2 only
    line = "A man is riding a bike.\n"
    nbest = ["--beam", "2", "--nbest", "2"]  # the n-best scores include the length penalty
    tuned = run_cli("tmt-translate", str(best), *nbest, stdin=line)
    assert tuned.returncode == 0 and "α 0.7, chosen by the checkpoint's run" in tuned.stderr
    given = run_cli("tmt-translate", str(best), *nbest, "--alpha", "0.7", stdin=line)
    assert given.returncode == 0 and "chosen by" not in given.stderr
    other = run_cli("tmt-translate", str(best), *nbest, "--alpha", "2.2", stdin=line)
    assert tuned.stdout == given.stdout != other.stdout


def test_evaluate_tunes_alpha_on_val_with_a_grid(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    common = ["--beam", "2", "--batch-size", "128", "--json"]
    r = run_cli(
        "tmt-evaluate", str(best), "--split", "test", "--alpha-grid", "0,2", *common,
        "--output", str(tmp_path / "test.de"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    grid = result["alpha_grid"]
    assert list(grid) == ["0", "2"] and result["split"] == "test_2016_flickr"
    assert result["alpha"] == (2.0 if grid["2"] > grid["0"] else 0.0)  # the first of ties
    val = run_cli(
        "tmt-evaluate", str(best), "--split", "val", "--alpha", f"{result['alpha']:g}", *common,
        "--output", str(tmp_path / "val.de"),
    )  # fmt: skip
    assert val.returncode == 0, val.stderr
    assert json.loads(val.stdout.splitlines()[-1])["bleu"] == grid[f"{result['alpha']:g}"]
    for bad, message in (
        (["--alpha-grid", "1,x"], "'x' is not a number"),
        (["--alpha-grid", "1,-2"], "finite and ≥ 0"),
        (["--alpha-grid", "1", "--alpha", "1"], "exclude each other"),
        (["--alpha-grid", "1", "--greedy"], "needs beam search"),
    ):
        with pytest.raises(SystemExit) as exit_info:  # usage errors, in this process
            evaluate_cli.main([str(best), *bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, err


def test_missing_or_corrupt_checkpoint_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    r = run_cli("tmt-translate", str(tmp_path / "corrupt.pt"), stdin="hello\n")  # one process
    assert r.returncode == 1 and "corrupt.pt" in r.stderr and "Traceback" not in r.stderr
    mains = {
        "translate": translate_cli.main,
        "evaluate": evaluate_cli.main,
        "export": export_cli.main,
    }
    for name in ("nope.pt", "corrupt.pt"):
        for tool, main in mains.items():  # the others in this process: an exception escapes
            args = [str(tmp_path / name)] + ([str(tmp_path / "out")] if tool == "export" else [])
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            assert exit_info.value.code == 1, tool
            assert name in capsys.readouterr().err, tool
    assert not (tmp_path / "out").exists()


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    r = run_cli("tmt-train", "trainer.max_epoch=3", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0
    assert "max_epoch" in r.stderr


@pytest.mark.parametrize("defect", ["unequal_lines", "invalid_utf8", "missing_file"])
def test_bad_corpus_exits_non_zero_naming_the_file(tmp_path: Path, defect: str) -> None:
    raw = tmp_path / "raw"
    for split in ("train", "val", "test_2016_flickr"):
        write_gz(raw / f"{split}.en.gz", b"A dog runs.\nA cat sits.\n")
        write_gz(raw / f"{split}.de.gz", b"Ein Hund rennt.\nEine Katze sitzt.\n")
    if defect == "unequal_lines":
        write_gz(raw / "val.de.gz", b"Ein Hund rennt.\n")
        bad = "val.de.gz"
    elif defect == "invalid_utf8":
        write_gz(raw / "train.de.gz", b"Ein Hund rennt.\nEine Katze sitzt \xff.\n")
        bad = "train.de.gz:2"
    else:
        (raw / "test_2016_flickr.en.gz").unlink()
        bad = "test_2016_flickr.en.gz"
    r = run_cli("tmt-prepare", *data_overrides(tmp_path, "null"), f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode != 0
    assert bad in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    prepared = tmp_path / "prepared"  # nothing written but the preparation's lock file
    assert not prepared.exists() or all(p.suffix == ".lock" for p in prepared.iterdir())


def test_corpora_by_path_plain_and_gzip_through_the_console_scripts(tmp_path: Path) -> None:
    synthetic_corpus(tmp_path / "raw", n_train=300)
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    for lang in ("en", "xx"):
        with gzip.open(tmp_path / "raw" / f"train.{lang}.gz", "rt") as f:
            lines = f.read().splitlines(keepends=True)
        (corpora / f"first.{lang}").write_text("".join(lines[:180]))  # plain text
        write_gz(corpora / f"second.{lang}.gz", "".join(lines[180:]).encode())  # gzip
        shutil.copy(tmp_path / "raw" / f"val.{lang}.gz", corpora / f"dev.{lang}.gz")
        shutil.copy(tmp_path / "raw" / f"test_2016_flickr.{lang}.gz", corpora / f"t1.{lang}.gz")
        with gzip.open(tmp_path / "raw" / f"val.{lang}.gz", "rt") as f:
            (corpora / f"t2.{lang}").write_text(f.read())
    data = [
        "data=text",
        "data.src_lang=en",
        "data.tgt_lang=xx",
        f"data.train=[{corpora / 'first'},{corpora / 'second'}]",
        f"data.valid={corpora / 'dev'}",
        f"data.test=[{corpora / 't1'},{corpora / 't2'}]",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        "data.tokenizer.vocab_size=60",
    ]
    prep = run_cli("tmt-prepare", *data, f"hydra.run.dir={tmp_path / 'h'}")
    assert prep.returncode == 0, prep.stderr
    assert "dropped 0 of 300 training pairs" in prep.stdout  # both corpora, concatenated
    run_dir = tmp_path / "run"
    train = run_cli(
        "tmt-train", *data, "model=tiny", "trainer.max_steps=20", "trainer.max_tokens=256",
        "trainer.average_last=null", "trainer.final_beam_size=2", "trainer.final_alpha=1.0",
        "trainer.device=cpu", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    assert "using prepared data" in train.stdout
    results = RunResults.read(run_dir)
    assert results.final == "best.pt" and list(results.checkpoints["best.pt"].test) == ["t1", "t2"]
    assert "  t1 (beam 2, α 1): BLEU" in train.stdout and "  t2 (beam 2, α 1): BLEU" in train.stdout
    r = run_cli(
        "tmt-evaluate", str(run_dir / "checkpoints" / "final.pt"), "--split", "test", "--beam", "2",
        "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["split"] for row in rows] == ["t1", "t2"] and rows[0]["alpha"] == 1.0
    t2 = rows[1]
    assert t2["n_sentences"] == 20 and Path(t2["hypotheses"]).name == "final.t2.beam2-alpha1.xx"
    missing = run_cli("tmt-prepare", *data[:-1], "data.valid=/no/such/dev")
    assert missing.returncode == 1 and "/no/such/dev.en" in missing.stderr


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny en→de model and its tokenizer in one checkpoint: for what needs no
    trained run (in-process calls of the console scripts' main)."""
    return random_en_de_checkpoint(tmp_path_factory.mktemp("small") / "model.pt")


def feed_fifo(path: Path, data: bytes) -> threading.Thread:
    """A named pipe at ``path`` and a thread that writes ``data`` into it once it is opened."""
    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as f:
            f.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def drain_fifo(path: Path, thread: threading.Thread) -> None:
    """Let a writer that nobody read from finish (the test failed before opening it)."""
    if thread.is_alive():
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(5)
        os.close(fd)


def test_translate_and_evaluate_read_named_pipes(small_checkpoint: Path, tmp_path: Path) -> None:
    lines = b"a dog runs\n\nthe red ball on the street\n"
    (tmp_path / "in.en").write_bytes(lines)
    common = [str(small_checkpoint), "--greedy", "--device", "cpu"]
    plain = tmp_path / "plain.de"
    translate_cli.main([*common, "--input", str(tmp_path / "in.en"), "--output", str(plain)])
    fifo = tmp_path / "in.pipe"  # what `--input <(zcat in.en.gz)` gives
    writer = feed_fifo(fifo, lines)
    try:
        piped = tmp_path / "piped.de"
        translate_cli.main([*common, "--input", str(fifo), "--output", str(piped)])
    finally:
        drain_fifo(fifo, writer)
    assert piped.read_text() == plain.read_text() and len(plain.read_text().splitlines()) == 3
    src, ref = tmp_path / "src.pipe", tmp_path / "ref.pipe"
    writers = [feed_fifo(src, b"a dog runs\nthe red ball\n"), feed_fifo(ref, b"a\nb\n")]
    out = tmp_path / "hyps.de"
    try:
        evaluate_cli.main([*common, "--src", str(src), "--ref", str(ref), "--output", str(out)])
    finally:
        for path, writer in zip((src, ref), writers, strict=True):
            drain_fifo(path, writer)
    assert len(out.read_text().splitlines()) == 2


def test_a_directory_as_input_is_refused_naming_it(
    small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [str(small_checkpoint), "--greedy", "--device", "cpu"]
    for args in (["--input", str(tmp_path)], ["--input", str(tmp_path / "missing.en")]):
        with pytest.raises(SystemExit) as exit_info:
            translate_cli.main([*common, *args])
        assert exit_info.value.code == 1 and args[1] in capsys.readouterr().err
    (tmp_path / "ref.de").write_text("a\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main([*common, "--src", str(tmp_path), "--ref", str(tmp_path / "ref.de")])
    assert exit_info.value.code == 1
    assert f"{tmp_path} is a directory" in capsys.readouterr().err


def test_evaluate_refuses_empty_files_naming_them(
    small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty, ref = tmp_path / "empty.en", tmp_path / "ref.de"
    empty.write_text("")
    ref.write_text("ein Hund\n")
    (tmp_path / "empty.de").write_text("")
    common = [str(small_checkpoint), "--greedy", "--device", "cpu"]
    for src_file, ref_file in ((empty, tmp_path / "empty.de"), (empty, ref)):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_cli.main([*common, "--src", str(src_file), "--ref", str(ref_file)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1, err
        assert f"error: {empty} is empty" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.de", "empty.en", "ref.de"]


def test_attention_files_are_named_as_the_help_says(small_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "in.en").write_text("a dog runs\n\nthe red ball\n")
    out = tmp_path / "attention"
    translate_cli.main(
        [str(small_checkpoint), "--greedy", "--device", "cpu", "--attention-dir", str(out),
         "--input", str(tmp_path / "in.en"), "--output", str(tmp_path / "out.de")]
    )  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000001.npy", "000001.png", "000003.npy", "000003.png"]
    assert "DIR/000001.png" in (translate_cli.__doc__ or "")


def test_a_non_finite_max_len_a_is_a_usage_error_naming_it(
    small_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for value in ("inf", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            translate_cli.parse_args([str(small_checkpoint), "--max-len-a", value])
        assert exit_info.value.code == 2 and "max_len_a" in capsys.readouterr().err


def test_attention_layer_and_head_need_attention_dir(
    small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html = ["--attention-html", str(tmp_path / "a.html")]  # explores every layer and head
    for given in (["--attention-layer", "0"], ["--attention-head", "1"]):
        for others in ([], html):
            with pytest.raises(SystemExit) as exit_info:
                translate_cli.parse_args([str(small_checkpoint), *given, *others])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and f"{given[0]} needs --attention-dir" in err
    chosen = translate_cli.parse_args(
        [str(small_checkpoint), "--attention-dir", str(tmp_path), "--attention-layer", "0"]
    )
    assert (chosen.attention_layer, chosen.attention_head) == (0, None)
    default = translate_cli.parse_args([str(small_checkpoint), "--attention-dir", str(tmp_path)])
    assert default.attention_layer == -1  # the last layer


def test_evaluate_keeps_the_hypotheses_of_sources_of_one_name_apart(
    small_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = [str(small_checkpoint), "--greedy", "--device", "cpu", "--json"]
    lines = {"a": "a dog runs\n", "b": "the red ball\na cat sits\n"}
    hypotheses = {}
    for folder, text in lines.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.en").write_text(text)
        (tmp_path / folder / "test.de").write_text(text)
        src, ref = tmp_path / folder / "test.en", tmp_path / folder / "test.de"
        evaluate_cli.main([*common, "--src", str(src), "--ref", str(ref)])
        row = json.loads(capsys.readouterr().out)
        assert row["split"] == "test"
        hypotheses[folder] = Path(row["hypotheses"])
    assert hypotheses["a"] != hypotheses["b"]
    for folder, path in hypotheses.items():  # each beside the checkpoint, neither overwritten
        assert path.parent == small_checkpoint.parent
        assert re.fullmatch(r"model\.test-[0-9a-f]{8}\.beam1\.de", path.name), path.name
        assert len(path.read_text().splitlines()) == len(lines[folder].splitlines())
    monkeypatch.chdir(tmp_path)  # the same file again, by a relative path: the same name
    evaluate_cli.main([*common, "--src", "a/test.en", "--ref", "a/test.de"])
    assert Path(json.loads(capsys.readouterr().out)["hypotheses"]) == hypotheses["a"]


def test_freeze_loaded_takes_what_is_alive_out_of_the_collectors_generations() -> None:
    loaded = [object()]  # a container the collector tracks, alive when loading is done
    assert any(o is loaded for o in gc.get_objects())
    freeze_loaded()
    assert gc.get_freeze_count() > 0
    assert not any(o is loaded for o in gc.get_objects())  # frozen: no pass walks it again
    later = [object()]
    assert any(o is later for o in gc.get_objects())  # what decoding allocates is not frozen
