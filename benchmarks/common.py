"""What the benchmark commands share: prompt words, the percentile, a prompt of N tokens, a started process."""
from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Sequence

from proxy.config import ProxyConfig
from proxy.routing.router import Router

WORDS = (
    "the of and to in is was for on that with as by at from his her which an be this have are not but had "
    "they were its their one all would there been has when who more will if no out so said what up about into "
    "than them can only other new some could time these two may then first any like now my such make over "
    "cache block prefix router backend latency token model serving request memory batch decode prefill"
).split()


def make_text(n_tokens: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    tok = Router(ProxyConfig(backends=[]).routing()).tokenizer
    words: list[str] = []
    while True:
        words.extend(rng.choice(WORDS) for _ in range(256))
        text = " ".join(words)
        ids = tok.encode(text)
        if len(ids) >= n_tokens:
            return tok.decode(ids[:n_tokens])


def pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def start_process(args: list[str], ready: str, n: int = 1) -> tuple[subprocess.Popen, list[str]]:
    """`python ARGS`, and the first `n` http:// URLs it prints on lines containing `ready` (60 s at most)."""
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    urls: list[str] = []
    deadline = time.monotonic() + 60
    while len(urls) < n and time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if ready in line:
            urls.extend(t.rstrip(",;)") for t in line.split() if t.startswith("http://"))
    if len(urls) < n:
        p.kill()
        raise RuntimeError(f"{' '.join(args)} did not start")
    return p, urls[:n]
