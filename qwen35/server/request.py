"""One request as the engine sees it (its prompt ids, sampling, limits, and the queue its results arrive on),
and the reasons the engine turns one away at submit."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..generation import Response
from ..sampling import SamplingParams


class QueueFull(Exception):
    pass


class MemoryBudgetExceeded(Exception):
    """The request's state alone is larger than the server's memory budget: it could never run."""


class ShuttingDown(Exception):
    """The engine is draining or stopped: it takes no new requests."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    boundary: int = 0  # a turn boundary inside the prompt worth a snapshot (0 = none)
    prefix: int = 0  # the end of a long opening system turn, which other conversations share (0 = none)
    timeout_s: float | None = None
    guide: Any = None  # guide.GuideSpec of a constrained request: each row starts its own state from it
    images: list | None = None  # multimodal.VisionInput per image run in `prompt` (pads expanded), or None
    key: list[int] | None = None  # what prompt reuse matches (image pads as content hashes); None: `prompt`
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    drops_answers: bool = False  # its prompt continues an earlier one but not the answer given to it
    generated: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    reserved_bytes: int = 0  # KV + state this request holds against the memory budget (set at submit)

    def cancel(self) -> None:
        self.cancelled.set()


Token = Response  # what a request's queue carries: a generated token, or an end without one (token None)
