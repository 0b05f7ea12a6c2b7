"""What the engine knows about one request: sampling parameters, progress, emulated timings, output."""
from __future__ import annotations

import asyncio
import enum
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
    counted_query: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    timings: RequestTimings = field(default_factory=RequestTimings)
    token_times: list[float] = field(default_factory=list)
    outputs: asyncio.Queue[TokenOutput] = field(default_factory=asyncio.Queue)
    client_request_id: str = ""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
