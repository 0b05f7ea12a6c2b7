"""What the engine knows about one request: sampling parameters, progress, emulated timings, output."""
from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field

from .detokenizer import OutputText
from .generator import SequenceGenerator
from .kv_cache_manager import KVSequence


@dataclass(frozen=True)
class SamplingParams:
    """The parameters that change what (or how much) the dummy model generates."""

    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    seed: int | None = None
    n: int = 1  # parallel samples; the engine sees one request per sample
    logprobs: int | None = None  # top alternatives per sampled token (None: no logprobs)
    prompt_logprobs: int | None = None  # vLLM skips the prefix cache for these requests
    max_tokens_set: bool = True  # False: max_tokens is the default cap; the answer ends at a natural length


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class RequestTimings:
    """Emulated seconds on the engine's clock (what the modelled GPU would have taken)."""

    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival


@dataclass(slots=True)
class TokenOutput:
    """One generated token as the API layer streams it (text is the delta to send)."""

    request_id: str
    token_id: int | None
    text: str
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputChannel:
    """A request's token hand-off from the engine to its consumer: a deque and at most one waiter.

    Lighter than asyncio.Queue on the per-token hot path (hundreds of streams per engine step).
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[TokenOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: TokenOutput) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> TokenOutput:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class EngineRequest:
    """A request inside an engine; created by `Engine.make_request`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seq: KVSequence
    generator: SequenceGenerator
    text: OutputText
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    prefilling: bool = False  # scheduled and its prompt (or recompute) not yet fully computed
    counted_query: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    timings: RequestTimings = field(default_factory=RequestTimings)
    token_times: list[float] = field(default_factory=list)
    outputs: OutputChannel = field(default_factory=OutputChannel)
    client_request_id: str = ""
    natural_length: int | None = None  # EOS after this many output tokens (no max_tokens from the client)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
