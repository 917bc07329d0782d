"""Decoding in worker processes (PooledTranslator, ``--workers``): the translations of one
process, errors that say what went wrong, and a pool that survives a dead worker."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import WORDS, random_en_de_checkpoint
from transformer_mt.cli import common as cli_common
from transformer_mt.cli import evaluate as evaluate_cli
from transformer_mt.cli import serve as serve_cli
from transformer_mt.cli import translate as translate_cli
from transformer_mt.decoding import SearchOptions, Translator
from transformer_mt.decoding import workers as workers_module
from transformer_mt.decoding.workers import PooledTranslator
from transformer_mt.errors import UserError
from transformer_mt.export.ctranslate2 import export_ctranslate2
from transformer_mt.export.ctranslate2_engine import CTranslate2Translator
from transformer_mt.serve.app import Limits, create_app


def lines(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_en_de_checkpoint(tmp_path_factory.mktemp("workers") / "model.pt")


@pytest.fixture(scope="module")
def single(checkpoint: Path) -> Translator:
    return Translator.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def pooled(single: Translator) -> Iterator[PooledTranslator]:
    # as many threads as this process: the same kernels, so the same floating-point sums
    with PooledTranslator(single, workers=2, threads=torch.get_num_threads()) as translator:
        yield translator


SEARCHES = {
    "greedy": SearchOptions(beam_size=1),
    "beam, n-best": SearchOptions(beam_size=4, nbest=3, alpha=1.0),
    "sampling": SearchOptions(beam_size=1, sample=True, topk=5, seed=3, nbest=2),
}


@pytest.mark.parametrize("options", SEARCHES.values(), ids=SEARCHES.keys())
def test_two_workers_translate_as_one_process(
    single: Translator, pooled: PooledTranslator, options: SearchOptions
) -> None:
    text = [*lines(30), "", *lines(9, seed=2)]  # an empty line among them
    expected = single.translate_ids(text, options, batch_size=4)
    assert pooled.translate_ids(text, options, batch_size=4) == expected
    assert len({tuple(h[0].tokens) for h in expected}) > 10  # real, varied outputs
    # a later chunk of a file (first_index: where its sampling streams start)
    tail = pooled.translate_ids(text[7:], options, batch_size=4, first_index=7)
    assert tail == single.translate_ids(text[7:], options, batch_size=4, first_index=7)


def test_the_workers_are_other_processes_and_ignore_ctrl_c(
    single: Translator, pooled: PooledTranslator
) -> None:
    pids = pooled.pids()
    assert len(pids) == 2 and os.getpid() not in pids
    os.kill(pids[0], signal.SIGINT)  # what Ctrl-C sends the whole process group
    time.sleep(0.5)
    assert not is_gone(pids[0]) and pooled.pids() == pids
    text = lines(12)
    assert pooled.translate(text, batch_size=2) == single.translate(text, batch_size=2)


def test_a_half_precision_translator_keeps_its_copy_and_workers_make_theirs(
    checkpoint: Path,
) -> None:
    half = Translator.from_checkpoint(checkpoint, precision="bf16")
    text = lines(16)
    with PooledTranslator(half, workers=2, threads=torch.get_num_threads()) as pooled:
        assert pooled.search_model is half.search_model and pooled.precision == "bf16"
        assert pooled.translate(text, batch_size=4) == half.translate(text, batch_size=4)


def test_one_worker_decodes_in_this_process(single: Translator) -> None:
    translator = PooledTranslator(single, workers=1)
    assert translator.pids() == [os.getpid()]
    assert translator.translate(lines(5), beam_size=2) == single.translate(lines(5), beam_size=2)


def is_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_workers_end_with_the_pool_or_when_their_parent_is_killed(
    single: Translator, checkpoint: Path
) -> None:
    with PooledTranslator(single, workers=2, threads=1) as translator:
        pids = translator.pids()
    assert all(is_gone(pid) for pid in pids)
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_PARENT, str(checkpoint)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        try:
            assert parent.stdout is not None
            pids = [int(pid) for pid in parent.stdout.readline().split()]
            assert len(pids) == 2 and not any(is_gone(pid) for pid in pids)
        finally:
            parent.kill()  # no shutdown of its pool: the workers notice their parent is gone
    for _ in range(300):
        if all(is_gone(pid) for pid in pids):
            break
        time.sleep(0.1)
    assert all(is_gone(pid) for pid in pids)


# A process that starts two workers, prints their ids and waits (killed by the test above).
KILLED_PARENT = """
import sys
from transformer_mt.decoding import Translator
from transformer_mt.decoding.workers import PooledTranslator

translator = PooledTranslator(Translator.from_checkpoint(sys.argv[1]), workers=2, threads=1)
print(*translator.pids(), flush=True)
sys.stdin.read()
"""


def test_a_script_without_the_main_guard_is_told_why_its_workers_did_not_start(
    checkpoint: Path, tmp_path: Path
) -> None:
    script = tmp_path / "unguarded.py"  # spawned workers import it, and start workers again
    script.write_text(KILLED_PARENT.replace("sys.stdin.read()", ""))
    done = subprocess.run(
        [sys.executable, str(script), str(checkpoint)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "failed to start" in done.stderr and '`if __name__ == "__main__":`' in done.stderr


def test_weights_that_do_not_fit_in_shared_memory_are_a_clear_error(
    single: Translator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(obj: object) -> bytes:
        raise RuntimeError("unable to write to file </torch_1_2_3>: No space left on device (28)")

    monkeypatch.setattr(workers_module.ForkingPickler, "dumps", full)
    translator = PooledTranslator(single, workers=2, threads=1)
    with pytest.raises(UserError, match=r"No space left.*/dev/shm too small.*--workers 1"):
        translator.start()
    assert translator._pool is None  # nothing started


def test_workers_left_running_stop_when_their_translator_goes_or_their_process_ends(
    single: Translator, checkpoint: Path, tmp_path: Path
) -> None:
    translator = PooledTranslator(single, workers=2, threads=1)
    pids = translator.pids()
    del translator  # never closed
    gc.collect()
    assert all(is_gone(pid) for pid in pids)
    script = tmp_path / "child.py"  # a child process that leaves its workers running
    script.write_text(CHILD_WITH_WORKERS)
    done = subprocess.run(
        [sys.executable, str(script), str(checkpoint)], capture_output=True, text=True, timeout=60
    )  # before the exit hook that stops them, the child waited for them forever
    assert done.returncode == 0, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2 and all(is_gone(pid) for pid in pids)


CHILD_WITH_WORKERS = """
import gc
import multiprocessing
import sys

from transformer_mt.decoding import Translator
from transformer_mt.decoding.workers import PooledTranslator


def child(path):
    translator = PooledTranslator(Translator.from_checkpoint(path), workers=2, threads=1)
    print(*translator.pids(), flush=True)  # not closed, and never collected:
    gc.freeze()  # as the console scripts do once loaded


if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1],))
    process.start()
    process.join()
    sys.exit(process.exitcode)
"""


def test_a_dead_worker_is_an_error_and_the_next_call_starts_new_workers(
    single: Translator,
) -> None:
    text = lines(24)
    with PooledTranslator(single, workers=2, threads=1) as translator:
        os.kill(translator.pids()[0], signal.SIGKILL)
        time.sleep(1.0)  # the pool's manager notices the death
        with pytest.raises(RuntimeError, match="a decoding worker process died"):
            translator.translate(text, beam_size=2, batch_size=2)
        again = translator.translate(text, beam_size=2, batch_size=2)
        assert len(translator.pids()) == 2
    assert again == single.translate(text, beam_size=2, batch_size=2)


def test_bad_worker_settings_are_clear_errors(single: Translator) -> None:
    with pytest.raises(UserError, match="--workers must be ≥ 1, got 0"):
        PooledTranslator(single, workers=0)
    with pytest.raises(UserError, match="threads per worker must be ≥ 1, got 0"):
        PooledTranslator(single, workers=2, threads=0)
    on_gpu = copy.copy(single)
    on_gpu.device = torch.device("cuda")
    with pytest.raises(UserError, match="--workers 2: decoding workers are for CPUs"):
        PooledTranslator(on_gpu, workers=2)


def test_the_threads_are_shared_out_between_the_workers(
    single: Translator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # this process's threads
    assert workers_module.thread_shares(2) == [2, 1]  # the remainder is not left idle
    assert workers_module.thread_shares(3) == [1, 1, 1]
    assert workers_module.thread_shares(4) == [1, 1, 1, 1]  # at least one each
    assert workers_module.threads_per_worker(2) == 1  # CTranslate2's: one count for all
    with PooledTranslator(single, workers=2) as translator:
        assert sorted(translator.worker_threads().values()) == [1, 2]  # as the workers see it
    assert PooledTranslator(single, workers=3, threads=2).threads == [2, 2, 2]


def test_a_tokenizer_pickles_as_its_model(single: Translator) -> None:
    tokenizer = pickle.loads(pickle.dumps(single.tokenizer))
    assert tokenizer.model_bytes == single.tokenizer.model_bytes
    assert tokenizer.encode(["a red dog"]) == single.tokenizer.encode(["a red dog"])


@pytest.fixture
def threads_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker gets this process's threads: the same kernels, so the same sums."""
    monkeypatch.setattr(workers_module, "thread_shares", lambda n: [torch.get_num_threads()] * n)
    monkeypatch.setattr(cli_common, "threads_per_worker", lambda n: torch.get_num_threads())


@pytest.mark.usefixtures("threads_of_one_process")
def test_tmt_translate_and_tmt_evaluate_with_workers_write_what_one_process_writes(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, ref = tmp_path / "in.en", tmp_path / "ref.de"
    src.write_text("".join(line + "\n" for line in lines(40)))
    ref.write_text("".join(line + "\n" for line in lines(40, seed=3)))
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out.{workers}.de"
        common = [str(checkpoint), "--beam", "3", "--device", "cpu", "--batch-size", "8"]
        translate_cli.main(
            [*common, "--input", str(src), "--output", str(out), "--workers", workers]
        )
        scored = tmp_path / f"scored.{workers}.de"
        evaluate_cli.main(
            [*common, "--src", str(src), "--ref", str(ref), "--output", str(scored),
             "--workers", workers, "--json"]
        )  # fmt: skip
        outputs[workers] = (out.read_text(), scored.read_text())
        capsys.readouterr()
    assert outputs["2"] == outputs["1"]
    assert len(outputs["1"][0].splitlines()) == 40 and outputs["1"][0] == outputs["1"][1]
    with pytest.raises(SystemExit) as exit_info:
        translate_cli.main([str(checkpoint), "--workers", "0"])
    assert exit_info.value.code == 2
    assert "--workers must be ≥ 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        translate_cli.main([str(checkpoint), "--workers", "2", "--interactive"])
    assert exit_info.value.code == 2
    assert "--interactive decodes one line at a time" in capsys.readouterr().err


@pytest.mark.usefixtures("threads_of_one_process")
def test_tmt_serve_with_workers_answers_as_with_one_and_stops_them_at_shutdown(
    checkpoint: Path,
) -> None:
    text = lines(20)
    flags = [str(checkpoint), "--device", "cpu", "--beam", "2", "--batch-size", "4"]
    one = serve_cli.load_engine(serve_cli.parse_args(flags))
    expected = [nbest[0][0] for nbest in one.decode(text, one.options, None)]
    engine = serve_cli.load_engine(serve_cli.parse_args([*flags, "--workers", "2"]))
    pooled = engine.close.__self__  # type: ignore[attr-defined]
    assert isinstance(pooled, PooledTranslator)
    pids = pooled.pids()
    with TestClient(create_app(engine, Limits(batch_timeout_ms=0))) as client:
        answer = client.post("/translate", json={"q": text, "source": "en", "target": "de"})
        assert answer.status_code == 200 and answer.json()["translatedText"] == expected
        assert not any(is_gone(pid) for pid in pids)
    assert all(is_gone(pid) for pid in pids)


@pytest.mark.usefixtures("threads_of_one_process")
def test_ctranslate2_workers_are_its_inter_threads(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = export_ctranslate2(checkpoint, tmp_path / "ct2")
    src = tmp_path / "in.en"
    src.write_text("".join(line + "\n" for line in lines(40)))
    loaded: list[int] = []  # each loaded export's number of parallel translators
    from_dir = CTranslate2Translator.from_dir

    def spy(*args: Any, **kwargs: Any) -> CTranslate2Translator:
        translator = from_dir(*args, **kwargs)
        loaded.append(translator.translator.num_translators)
        return translator

    monkeypatch.setattr(CTranslate2Translator, "from_dir", spy)
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out.{workers}.de"
        translate_cli.main(
            [str(export), "--engine", "ctranslate2", "--device", "cpu", "--beam", "3",
             "--batch-size", "8", "--input", str(src), "--output", str(out), "--workers", workers]
        )  # fmt: skip
        outputs.append(out.read_text())
    assert outputs[1] == outputs[0] and len(outputs[0].splitlines()) == 40
    assert loaded == [1, 2]
