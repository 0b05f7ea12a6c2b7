"""How long the dummy model talks when the client sets no `max_tokens`: a length drawn per request.

A real model ends its answer with EOS; the emulator's text never would, so a chat without
`max_tokens` generated to the context limit (4,071 tokens, 73 s under `make run`). Now such a
request ends with EOS after a length drawn from this distribution: seeded by the server seed, the
request's seed and its prompt, so the same request always gets the same length. As in vLLM, the EOS
is not sampled before `min_tokens` and never with `ignore_eos`, and `max_tokens` (set or defaulted)
still caps the output. A request that sets `max_tokens` is left to it: benchmarks and the load
generator set it and get exactly that many tokens (with `ignore_eos`, as vLLM's benchmarks do).

Spec: `lognormal:MEDIAN,SIGMA` (default `lognormal:150,1.0`: median 150 tokens, mean ~250, ~1 in 100
answers past 1,500 - the shape of chat answers in ShareGPT/LMSYS-style traces), `uniform:LO,HI`,
`fixed:N`, or `off` (generate to the cap, as before).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

DEFAULT_NATURAL_LENGTH = "lognormal:150,1.0"
FORMS = "lognormal:MEDIAN,SIGMA, uniform:LO,HI, fixed:N or off"


@dataclass(frozen=True)
class LengthDistribution:
    """Output lengths in tokens (>= 1); `draw` is None for `off`."""

    kind: str
    a: float = 0.0
    b: float = 0.0

    def draw(self, rng: random.Random) -> int | None:
        if self.kind == "off":
            return None
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(self.a * math.exp(self.b * rng.gauss(0.0, 1.0))))  # lognormal around the median


def parse_length_distribution(spec: str) -> LengthDistribution:
    """The distribution a spec names; ValueError saying which forms exist."""
    kind, _, args = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "off" and not args:
        return LengthDistribution("off")
    try:
        nums = [float(x) for x in args.split(",")] if args else []
    except ValueError:
        nums = []
    want = {"lognormal": 2, "uniform": 2, "fixed": 1}.get(kind)
    if want is None or len(nums) != want:
        raise ValueError(f"natural_length {spec!r}: expected {FORMS}")
    if kind == "lognormal" and not (nums[0] >= 1 and nums[1] >= 0):
        raise ValueError(f"natural_length {spec!r}: lognormal needs MEDIAN >= 1 and SIGMA >= 0")
    if kind == "uniform" and not (1 <= nums[0] <= nums[1]):
        raise ValueError(f"natural_length {spec!r}: uniform needs 1 <= LO <= HI")
    if kind == "fixed" and nums[0] < 1:
        raise ValueError(f"natural_length {spec!r}: fixed needs N >= 1")
    return LengthDistribution(kind, *nums)
