"""Serving benchmark (``make bench-serve``): start ``tmt-serve`` on loopback with a trained
checkpoint, drive it with 1, 8 and 32 concurrent clients, each sending test_2016_flickr
sentences one per request, and print per level: sentences/s, p50/p95/p99 latency, errors,
the mean decoding batch the server formed (from its /metrics), and the ratio to offline
``Translator.translate`` throughput (what tmt-translate runs) on the same sentences in the
same run. Then 1,000 malformed requests of every class the server refuses, each of which
must get a 4xx, and good requests afterwards, which must get the offline translations.

    python scripts/bench_serve.py --checkpoint runs/multi30k_en-de/default/checkpoints/final.pt
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from omegaconf import OmegaConf

from transformer_mt.cli.common import search_for
from transformer_mt.data.directions import fetch_raw, read_references
from transformer_mt.decoding import SearchOptions, Translator

DEFAULT_CHECKPOINT = Path("runs/multi30k_en-de/default/checkpoints/final.pt")
MALFORMED: list[tuple[str, bytes]] = [
    ("/v1/translate", b"{not json"),
    ("/v1/translate", b'{"inputs": "a dog"}'),
    ("/v1/translate", b'{"inputs": [5]}'),
    ("/v1/translate", b'{"inputs": []}'),
    ("/v1/translate", b'{"inputs": ["   "]}'),
    ("/v1/translate", b'{"inputs": ["a \xff dog"]}'),
    ("/v1/translate", json.dumps({"inputs": ["a" * 5000]}).encode()),
    ("/v1/translate", json.dumps({"inputs": ["a dog"] * 1000}).encode()),
    ("/v1/translate", b'{"inputs": ["a"], "nbest": 9, "beam_size": 2}'),
    ("/v1/translate", b"x" * 1_000_000),
    ("/translate", b'{"q": "a dog", "source": "xx", "target": "de"}'),
    ("/translate", b'{"q": 3, "source": "en", "target": "de"}'),
    ("/v1/attention", b'{"input": ""}'),
]


def parse_args() -> argparse.Namespace:
    """The command-line flags; the module docstring is the help text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    p.add_argument("--sentences", type=int, default=320, help="requests per level")
    p.add_argument("--malformed", type=int, default=1000)
    p.add_argument(
        "--serve-args", default="", help="more tmt-serve flags, e.g. '--batch-timeout-ms 50'"
    )
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    return p.parse_args()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_client = threading.local()  # each client thread's HTTP connection


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one POST, on the calling thread's kept-alive connection
    (HTTP/1.1, as a browser or a requests.Session client keeps it), opened again if the
    server closed it."""
    parts = urllib.parse.urlsplit(url)
    start = time.perf_counter()
    for attempt in range(2):
        conn = getattr(_client, "conn", None)
        if conn is None:
            conn = _client.conn = http.client.HTTPConnection(
                parts.hostname, parts.port, timeout=timeout
            )
        try:
            conn.request("POST", parts.path, body, {"content-type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.will_close:
                conn.close()
                _client.conn = None
            return response.status, data, time.perf_counter() - start
        except (http.client.HTTPException, OSError) as e:  # closed by the server, or no answer
            conn.close()
            _client.conn = None
            if attempt:
                return 0, str(e).encode(), time.perf_counter() - start
    raise AssertionError("unreachable")


def batch_stats(url: str) -> tuple[float, float]:
    """(decoding batches, sentences in them) so far, from the server's /metrics."""
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    count = float(re.search(r"^tmt_batch_sentences_count (\S+)", text, re.M).group(1))
    total = float(re.search(r"^tmt_batch_sentences_sum (\S+)", text, re.M).group(1))
    return count, total


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (1-99) of ``values``."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    """Start ``tmt-serve`` in a subprocess, load it at each level of concurrent clients, then
    with malformed requests, and print the table."""
    args = parse_args()
    if not args.checkpoint.is_file():
        sys.exit(
            f"error: {args.checkpoint} not found; train first (make train) or pass --checkpoint"
        )
    translator = Translator.from_checkpoint(args.checkpoint)
    data_cfg = OmegaConf.create(translator.config["data"])
    fetch_raw(data_cfg)
    _, src, _ = read_references(data_cfg, "test")[0]
    args.search, args.alpha = SearchOptions(beam_size=5), None
    beam = search_for(args, args.checkpoint, translator.step)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "transformer_mt.cli.serve",
        str(args.checkpoint),
        "--port",
        str(port),
        *shlex.split(args.serve_args),
    ]
    log = open(Path(tempfile.gettempdir()) / f"tmt-serve-{port}.log", "w+b")  # noqa: SIM115
    server = subprocess.Popen(command, stderr=log)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None:
                    log.seek(0)
                    sys.exit(log.read().decode())
                time.sleep(0.1)
        # Offline, in the same run: the batch throughput and one sentence's time.
        n = args.sentences
        sentences = src[:n]
        translator.translate(sentences[:64], beam)
        start = time.perf_counter()
        offline = translator.translate(sentences, beam)
        offline_rate = n / (time.perf_counter() - start)
        alone = []  # each sentence's time translated on its own
        for s in sentences:
            t = time.perf_counter()
            translator.translate([s], beam)
            alone.append(time.perf_counter() - t)
        single = statistics.median(alone)
        del translator  # the server has the cores from here on
        torch.set_num_threads(1)

        levels = []
        for clients in [int(c) for c in args.levels.split(",")]:
            before = batch_stats(url)

            def one(i: int) -> tuple[int, str, float]:
                body = json.dumps({"inputs": [sentences[i]]}).encode()
                status, out, seconds = post(url + "/v1/translate", body)
                text = json.loads(out)["outputs"][0][0]["text"] if status == 200 else ""
                return status, text, seconds

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(one, range(n)))
            wall = time.perf_counter() - start
            after = batch_stats(url)
            latencies = [r[2] for r in results]
            wrong = sum(r[1] != offline[i] for i, r in enumerate(results) if r[0] == 200)
            levels.append(
                {
                    "clients": clients,
                    "requests": n,
                    "sentences_per_s": n / wall,
                    "vs_offline": n / wall / offline_rate,
                    "p50_s": percentile(latencies, 50),
                    "p95_s": percentile(latencies, 95),
                    "p99_s": percentile(latencies, 99),
                    # Like with like: the served p99 against the p99 of the same sentences
                    # translated alone, and the p99 of each sentence's served / alone time.
                    "p99_vs_alone": percentile(latencies, 99) / percentile(alone, 99),
                    "p99_ratio": percentile(
                        [t / a for t, a in zip(latencies, alone, strict=True)], 99
                    ),
                    "errors": sum(r[0] != 200 for r in results),
                    "different_from_offline": wrong,
                    "mean_batch": (after[1] - before[1]) / max(after[0] - before[0], 1),
                }
            )
            print(f"  {clients} clients: {wall:.1f} s", file=sys.stderr, flush=True)

        statuses = []
        with ThreadPoolExecutor(8) as pool:
            bad = [MALFORMED[i % len(MALFORMED)] for i in range(args.malformed)]
            statuses = list(pool.map(lambda pb: post(url + pb[0], pb[1])[0], bad))
        after_ok = [
            json.loads(post(url + "/v1/translate", json.dumps({"inputs": [s]}).encode())[1])[
                "outputs"
            ][0][0]["text"]
            for s in sentences[:16]
        ]
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    print(
        f"\n{n} test_2016_flickr sentences, beam {beam.beam_size}, α {beam.alpha:g}, {args.checkpoint}"
    )
    print(
        f"offline Translator.translate: {offline_rate:.1f} sentences/s; one sentence alone: "
        f"median {1000 * single:.0f} ms, p99 {1000 * percentile(alone, 99):.0f} ms"
    )
    print(
        f"{'clients':>7} {'sent/s':>8} {'× offline':>9} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'p99/alone p99':>13} {'p99 served/alone':>16} {'errors':>6} {'batch':>6}"
    )
    for r in levels:
        print(
            f"{r['clients']:>7} {r['sentences_per_s']:8.1f} {r['vs_offline']:9.2f} {1000 * r['p50_s']:7.0f} "
            f"{1000 * r['p95_s']:7.0f} {1000 * r['p99_s']:7.0f} {r['p99_vs_alone']:13.2f} "
            f"{r['p99_ratio']:16.2f} {r['errors']:>6} {r['mean_batch']:6.1f}"
        )
    four = sum(400 <= s < 500 for s in statuses)
    same = sum(a == b for a, b in zip(after_ok, offline[:16], strict=True))
    print(
        f"malformed: {len(statuses)} requests, {four} answered 4xx, {len(statuses) - four} otherwise; "
        f"server alive: {alive}; afterwards {same}/{len(after_ok)} good requests gave the offline translation"
    )
    for r in levels:
        if r["different_from_offline"]:
            print(f"WARNING: {r['different_from_offline']} served translations differ from offline")
    if args.json:
        print(
            json.dumps(
                {
                    "offline_sentences_per_s": offline_rate,
                    "single_s": single,
                    "alone_p99_s": percentile(alone, 99),
                    "levels": levels,
                    "malformed": len(statuses),
                    "malformed_4xx": four,
                    "alive": alive,
                    "after_correct": same,
                }
            )
        )


if __name__ == "__main__":
    main()
