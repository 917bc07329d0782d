"""tmt-serve through the ASGI test client: every endpoint, answers equal to tmt-translate's
under concurrent load (micro-batching), and every class of bad input answered with a 4xx
while the server goes on serving."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import SMALL_MODEL_CONFIG, WORDS, random_en_de_checkpoint, run_cli
from transformer_mt.cli import serve as serve_cli
from transformer_mt.decoding import SearchOptions, Translator
from transformer_mt.serve.app import Limits, create_app
from transformer_mt.serve.batcher import MicroBatcher
from transformer_mt.serve.engine import NBest, torch_engine
from transformer_mt.serve.html import standalone_html

SEARCH = SearchOptions(beam_size=3, alpha=1.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_en_de_checkpoint(tmp_path_factory.mktemp("serve") / "model.pt")


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> TestClient:
    engine = torch_engine(Translator.from_checkpoint(checkpoint), SEARCH)
    limits = Limits(max_chars=200, max_inputs=8, batch_timeout_ms=50, max_attention_tokens=20)
    with TestClient(create_app(engine, limits)) as c:
        yield c


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 14))) for _ in range(n)]


def test_concurrent_requests_are_batched_and_equal_tmt_translate(
    client: TestClient, checkpoint: Path
) -> None:
    lines = sentences(24, seed=5)
    offline = run_cli(
        "tmt-translate", str(checkpoint), "--beam", "3", "--alpha", "1.0", stdin="\n".join(lines)
    )
    assert offline.returncode == 0, offline.stderr
    expected = offline.stdout.splitlines()
    assert len(set(expected)) > 5

    def one(line: str) -> str:
        r = client.post("/v1/translate", json={"inputs": [line]})
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0][0]["text"]

    with ThreadPoolExecutor(12) as pool:
        served = list(pool.map(one, lines))
    assert served == expected
    metrics = client.get("/metrics").text
    batches = float(re.search(r"^tmt_batch_sentences_count (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^tmt_batch_sentences_sum (\S+)", metrics, re.M).group(1))
    assert total >= 24 and batches < total  # some batches held several requests' sentences


def test_libretranslate_endpoint(client: TestClient) -> None:
    lines = sentences(3, seed=2)
    expected = Translator.from_checkpoint(client.app.state.engine.model_path).translate(
        lines, SEARCH
    )
    one = client.post("/translate", json={"q": lines[0], "source": "en", "target": "de"})
    assert one.status_code == 200 and one.json() == {"translatedText": expected[0]}
    many = client.post(
        "/translate", json={"q": lines, "source": "auto", "target": "de", "alternatives": 2}
    ).json()
    assert many["translatedText"] == expected
    assert len(many["alternatives"]) == 3 and all(len(a) <= 2 for a in many["alternatives"])
    wrong = client.post("/translate", json={"q": "a dog", "source": "en", "target": "fr"})
    assert wrong.status_code == 400 and "translates en→de, not en to fr" in wrong.json()["error"]


def test_v1_translate_nbest_scores_and_settings(client: TestClient) -> None:
    line = sentences(1, seed=3)[0]
    r = client.post("/v1/translate", json={"inputs": [line], "nbest": 3, "beam_size": 4}).json()
    hyps = r["outputs"][0]
    assert r["beam_size"] == 4 and len(hyps) == 3
    scores = [h["score"] for h in hyps]
    assert scores == sorted(scores, reverse=True)
    greedy = client.post("/v1/translate", json={"inputs": [line], "beam_size": 1}).json()
    assert greedy["outputs"][0][0]["score"] is None


def test_attention_explains_the_translation_of_the_search_asked_for(client: TestClient) -> None:
    for line in sentences(12, seed=5):
        wide = client.post("/v1/translate", json={"inputs": [line], "nbest": 6}).json()
        asked = {"input": line, "beam_size": wide["beam_size"], "alpha": wide["alpha"]}
        item = client.post("/v1/attention", json=asked).json()
        assert item["translation"] == wide["outputs"][0][0]["text"]
        default = client.post("/v1/translate", json={"inputs": [line]}).json()
        plain = client.post("/v1/attention", json={"input": line}).json()
        assert plain["translation"] == default["outputs"][0][0]["text"]
    bad = client.post("/v1/attention", json={"input": "a dog", "beam_size": 0})
    assert bad.status_code == 400 and "beam_size" in bad.json()["error"]
    long = client.post("/v1/attention", json={"input": " ".join(["dog"] * 30)})
    assert long.status_code == 413 and "at most 20" in long.json()["error"]


def test_attention_endpoint_returns_every_layer_and_head(client: TestClient) -> None:
    r = client.post("/v1/attention", json={"input": "the red ball"})
    assert r.status_code == 200, r.text
    item = r.json()
    src, tgt = item["source_tokens"], item["target_tokens"]
    assert src[-1] == "</s>" and tgt[-1] == "</s>"
    layers, heads = SMALL_MODEL_CONFIG["n_encoder_layers"], SMALL_MODEL_CONFIG["n_heads"]
    shapes = {
        "encoder": (layers, heads, len(src), len(src)),
        "decoder": (layers, heads, len(tgt), len(tgt)),
        "cross": (layers, heads, len(tgt), len(src)),
    }
    for kind, shape in shapes.items():
        weights = np.array(item["attention"][kind])
        assert weights.shape == shape, kind
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-3)
    decoder = np.array(item["attention"]["decoder"])
    assert np.allclose(np.triu(decoder, k=1), 0.0)  # no step sees the future
    html = standalone_html([item], "test")
    assert "renderExplorer" in html and '"source_tokens"' in html
    assert "<script src" not in html and "<link" not in html and "https://" not in html


def test_health_metrics_docs_and_page(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and (health["source"], health["target"]) == ("en", "de")
    assert health["beam_size"] == 3
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "tmt_requests_total" in metrics.text
    assert "tmt_request_seconds_bucket" in metrics.text
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/translate", "/v1/translate", "/v1/attention"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "renderExplorer" in page.text
    assert "/*EXPLORER*/" not in page.text and "https://" not in page.text  # all inlined


BAD_REQUESTS = [
    ("/v1/translate", b"{not json", 400, "JSON"),
    ("/v1/translate", b'{"inputs": "a dog"}', 400, "inputs"),
    ("/v1/translate", b'{"inputs": [5]}', 400, "inputs.0"),
    ("/v1/translate", b'{"inputs": []}', 400, "no input"),
    ("/v1/translate", b'{"inputs": ["  "]}', 400, "empty"),
    ("/v1/translate", b'{"inputs": ["a", ""]}', 400, "inputs[1]: empty"),
    ("/v1/translate", b'{"inputs": ["a \xff dog"]}', 400, "UTF-8"),
    ("/v1/translate", json.dumps({"inputs": ["a" * 201]}).encode(), 413, "201 characters"),
    ("/v1/translate", json.dumps({"inputs": ["a"] * 9}).encode(), 413, "9 inputs"),
    ("/v1/translate", b'{"inputs": ["a"], "nbest": 4, "beam_size": 2}', 400, "nbest"),
    ("/v1/translate", b'{"inputs": ["a"], "beam_size": 0}', 400, "beam_size"),
    ("/v1/translate", b'{"inputs": ["a"], "alpha": -1}', 400, "alpha"),
    ("/v1/translate", b'{"inputs": ["a"], "colour": "red"}', 400, "colour"),
    ("/v1/translate", b"[1, 2]", 400, "body"),
    ("/translate", b'{"q": "a dog", "source": "xx", "target": "de"}', 400, "not xx to de"),
    ("/translate", b'{"q": 3, "source": "en", "target": "de"}', 400, "q"),
    ("/translate", b'{"source": "en", "target": "de"}', 400, "q: Field required"),
    ("/v1/translate", b'{"inputs": ["a"], "nbest": 100}', 400, "nbest"),
    ("/v1/translate", b'{"inputs": ["a"], "nbest": 20}', 400, "at most 16"),
    ("/v1/translate", b'{"inputs": ["a"], "alpha": 1000}', 400, "alpha"),
    (
        "/translate",
        b'{"q": "a", "source": "en", "target": "de", "alternatives": 5000}',
        400,
        "alternatives",
    ),
    ("/v1/attention", b'{"input": ""}', 400, "empty"),
    ("/v1/attention", b'{"input": ["a"]}', 400, "input"),
]


@pytest.mark.parametrize(("path", "body", "status", "says"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_that_says_what_was_wrong(
    client: TestClient, path: str, body: bytes, status: int, says: str
) -> None:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_inputs_longer_than_the_model_reads_are_refused_not_truncated(
    client: TestClient,
) -> None:
    # max_positions 24: 23 subwords and EOS; "dog" is one subword
    fits, too_long = " ".join(["dog"] * 23), " ".join(["dog"] * 24)
    ok = client.post("/v1/translate", json={"inputs": [fits]})
    assert ok.status_code == 200 and ok.json()["outputs"][0][0]["text"]
    r = client.post("/v1/translate", json={"inputs": ["a dog", fits, too_long]})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "inputs[2]: 24 subwords; the model reads at most 23"
    lt = client.post("/translate", json={"q": too_long, "source": "en", "target": "de"})
    assert lt.status_code == 413 and lt.json()["error"].startswith("q[0]: 24 subwords;")
    assert client.post("/v1/translate", json={"inputs": ["a dog"]}).status_code == 200


def test_a_multilingual_models_limit_leaves_room_for_its_language_tag(tmp_path: Path) -> None:
    # max_positions 24: the tag, 22 subwords and EOS
    model = random_en_de_checkpoint(tmp_path / "mul.pt", pairs=["en-de", "de-en"])
    translator = Translator.from_checkpoint(model)
    fits, too_long = " ".join(["dog"] * 22), " ".join(["dog"] * 23)
    assert [len(ids) for ids in translator.tokenizer.encode([fits, too_long])] == [22, 23]

    def no_cut(index: int, length: int) -> None:
        raise AssertionError(f"input {index} ({length} subwords) was truncated")

    direct = translator.translate_ids([fits], SEARCH, tgt_lang="de", on_truncate=no_cut)
    with TestClient(create_app(torch_engine(translator, SEARCH))) as client:
        ok = client.post("/v1/translate", json={"inputs": [fits], "target": "de"})
        assert ok.status_code == 200, ok.text
        text = translator.tokenizer.decode([direct[0][0].tokens])[0]
        assert ok.json()["outputs"][0][0]["text"] == text
        r = client.post("/v1/translate", json={"inputs": ["a dog", too_long], "target": "de"})
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "inputs[1]: 23 subwords; the model reads at most 22"


def test_a_beam_size_alone_keeps_the_servers_nbest_where_it_fits(checkpoint: Path) -> None:
    search = SearchOptions(beam_size=3, alpha=1.0, nbest=3)  # tmt-serve --beam 3 --nbest 3
    engine = torch_engine(Translator.from_checkpoint(checkpoint), search)
    line = sentences(1, seed=3)[0]
    with TestClient(create_app(engine, Limits(batch_timeout_ms=0))) as c:

        def searched(**settings: int) -> tuple[int, int]:
            r = c.post("/v1/translate", json={"inputs": [line], **settings})
            assert r.status_code == 200, r.text
            return r.json()["beam_size"], len(r.json()["outputs"][0])

        assert searched() == (3, 3)
        assert searched(beam_size=2) == (2, 2)
        assert searched(beam_size=1) == (1, 1)
        assert searched(beam_size=5) == (5, 3)
        assert searched(beam_size=4, nbest=1) == (4, 1)
        bad = c.post("/v1/translate", json={"inputs": [line], "beam_size": 2, "nbest": 3})
        assert bad.status_code == 400 and "nbest" in bad.json()["error"]


def test_oversized_bodies_are_refused_and_the_server_goes_on(client: TestClient) -> None:
    huge = b'{"inputs": ["' + b"a" * 200_000 + b'"]}'
    r = client.post("/v1/translate", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert client.get("/nope").status_code == 404
    ok = client.post("/v1/translate", json={"inputs": ["a dog runs"]})
    assert ok.status_code == 200 and ok.json()["outputs"][0][0]["text"]


def test_a_missing_or_corrupt_checkpoint_stops_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_cli.main([str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 1 and "missing.pt" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        serve_cli.main([str(corrupt)])
    assert exit_info.value.code == 1 and "corrupt.pt" in capsys.readouterr().err


def test_translate_writes_a_standalone_attention_page(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "attention.html"
    result = run_cli(
        "tmt-translate",
        str(checkpoint),
        "--attention-html",
        str(out),
        stdin="a dog\n\nthe red ball\n",
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert len(printed) == 3
    html = out.read_text()
    items = json.loads(html.split("const ITEMS = ", 1)[1].split(";\n", 1)[0])
    # the empty line has no attention; the others explain what was printed for them
    assert [item["translation"] for item in items] == [printed[0], printed[2]]
    assert items[0]["source_tokens"][-1] == "</s>"
    assert [item["line"] for item in items] == [1, 3]  # input line numbers, blank lines counted
    assert f'<option value="1">3. {printed[2]}</option>' in html


def test_a_batch_waits_for_the_clients_it_answered_and_a_lone_client_never_waits() -> None:
    sizes: list[int] = []

    def decode(texts: list[str], options: SearchOptions, tgt: str | None) -> list[NBest]:
        sizes.append(len(texts))
        return [[(t.upper(), None)] for t in texts]

    async def scenario() -> None:
        batcher = MicroBatcher(decode, len, timeout=5.0)  # long: a wait would show
        batcher.start()
        one = SearchOptions(beam_size=1)

        async def client(text: str, delay: float = 0.0) -> str:
            await asyncio.sleep(delay)
            return (await batcher.translate([text], one))[0][0][0]

        # One client alone: answered, it sends again, and is decoded without waiting for
        # the sentence that arrives 0.3 s later.
        await client("a")
        assert await asyncio.gather(client("b"), client("c", 0.3)) == ["B", "C"]
        # Four at once: one client is expected back, and is, so the four are decoded at once.
        assert await asyncio.gather(*(client(t) for t in "defg")) == list("DEFG")
        # Their four clients come back, two of them later: one batch waits for all four.
        late = [client("h"), client("i"), client("j", 0.2), client("k", 0.2)]
        assert await asyncio.gather(*late) == list("HIJK")
        await batcher.stop()

    asyncio.run(scenario())
    assert sizes == [1, 1, 1, 4, 4]
