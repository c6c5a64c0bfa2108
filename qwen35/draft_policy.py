"""How many tokens to draft: acceptance statistics per draft position, the measured cost of a round, and the
adaptive choice of k (and of turning drafting off for a request) that speculative decoding makes each round.

A round with k drafts costs the MTP head's k steps plus a verify forward of k+1 tokens, and yields
1 + a1 + a1*a2 + ... tokens (a_i: the chance that draft i is accepted once drafts 1..i-1 were). Both sides
are measured while generating: the acceptance per position for each request (a Beta(1, 1) prior, so an
unseen position counts as a coin flip), and the wall time of a round for each (batch size, k), k = 0 being
a plain decode step. The first rounds try each k once (and one plain step); afterwards each round takes the
k with the most tokens per second. After MIN_ROUNDS_TO_TURN_OFF drafting rounds, a request whose best k is
slower than plain decoding has drafting turned off for its remaining tokens, and its stats say why. A
seeded sampled request drafts SEEDED_DRAFTS tokens a round instead (or the fixed k), so its seed reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADAPTIVE_MAX_DRAFTS = 4  # adaptive k is 1..4 (the MTP head's chained drafts past 4 are rarely accepted)
MIN_ROUNDS_TO_TURN_OFF = 8  # drafting rounds measured before a request's drafting may be turned off
EMA = 0.2  # weight of a new round time in its running estimate
# drafts per round of a seeded sampled request under adaptive k: the choice above follows measured wall-clock
# times, and a round of another k spends the seed's random numbers differently, so its text would change from
# run to run; a fixed k (this, or --draft-tokens) keeps a seed reproducible (not turned off by times either)
SEEDED_DRAFTS = 2


def seeded_sampling(params) -> bool:
    """A request whose seed must reproduce it: sampled (greedy decoding is the same at any k) with a seed."""
    return params.seed is not None and params.temperature > 0


@dataclass
class SpeculativeStats:
    """Per draft position i (0-based): rounds that drafted a token there and how many were accepted; rounds
    with k drafts (rounds_by_k[k]); tokens emitted; and whether drafting is on (else why it is off)."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)  # rounds that drafted i with drafts 0..i-1 all accepted
    rounds: int = 0
    rounds_by_k: dict[int, int] = field(default_factory=dict)
    tokens: int = 0
    drafting: str = "on"
    requests_off: dict[str, int] = field(default_factory=dict)  # aggregates: requests turned off, by reason

    def record(self, k: int, accepted: int, emitted: int | None = None) -> None:
        while len(self.drafted) < k:
            self.drafted.append(0)
            self.accepted.append(0)
            self.reached.append(0)
        self.rounds += 1
        self.rounds_by_k[k] = self.rounds_by_k.get(k, 0) + 1
        self.tokens += accepted + 1 if emitted is None else emitted
        for i in range(k):
            self.drafted[i] += 1
            self.accepted[i] += int(i < accepted)
            self.reached[i] += int(i <= accepted)

    @property
    def rounds_drafting(self) -> int:
        return sum(n for k, n in self.rounds_by_k.items() if k > 0)

    def turn_off(self, reason: str) -> None:
        self.drafting = f"off: {reason}"

    @property
    def acceptance(self) -> list[float]:
        """Accepted / drafted at each position (unconditional: position i counts every round that drafted it)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        out = {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
               "acceptance_per_position": [round(a, 4) for a in self.acceptance],
               "rounds_by_k": {str(k): n for k, n in sorted(self.rounds_by_k.items())},
               "tokens_per_round": round(self.tokens_per_round, 3), "drafting": self.drafting}
        if self.requests_off:
            out["requests_turned_off"] = dict(self.requests_off)
        return out

    def metrics(self, prefix: str = "qwen35_speculative") -> list[str]:
        """Prometheus text lines: drafted and accepted counters and the acceptance per draft position (1-based
        label), rounds, tokens emitted by drafting rounds, requests whose drafting was turned off by reason."""
        lines = [f"# TYPE {prefix}_rounds_total counter", f"{prefix}_rounds_total {self.rounds}",
                 f"# TYPE {prefix}_tokens_total counter", f"{prefix}_tokens_total {self.tokens}"]
        for name, values in (("drafted", self.drafted), ("accepted", self.accepted)):
            lines.append(f"# TYPE {prefix}_{name}_total counter")
            lines += [f'{prefix}_{name}_total{{position="{i + 1}"}} {v}' for i, v in enumerate(values)]
        lines.append(f"# TYPE {prefix}_acceptance gauge")
        lines += [f'{prefix}_acceptance{{position="{i + 1}"}} {a:.4f}' for i, a in enumerate(self.acceptance)]
        lines.append(f"# TYPE {prefix}_requests_turned_off_total counter")
        for reason, n in sorted(self.requests_off.items()):
            reason = reason.replace("\\", " ").replace('"', "'")
            lines.append(f'{prefix}_requests_turned_off_total{{reason="{reason}"}} {n}')
        return lines

    def summary(self) -> str:
        """One line for --verbose."""
        acc = " ".join(f"{a:.2f}" for a in self.acceptance) or "-"
        return (f"speculative: {self.rounds} rounds, {self.tokens_per_round:.2f} tokens/round, acceptance per "
                f"position [{acc}], drafting {self.drafting}")


def conditional_acceptance(stats: SpeculativeStats, k: int) -> list[float]:
    """a_i for i < k: accepted at i among rounds that accepted 1..i-1 (those reaching i), Beta(1, 1) prior."""
    return [((stats.accepted[i] if i < len(stats.accepted) else 0) + 1)
            / ((stats.reached[i] if i < len(stats.reached) else 0) + 2) for i in range(k)]


def expected_tokens(acceptance: list[float], k: int) -> float:
    """Tokens a round with k drafts yields: 1 + a1 + a1*a2 + ... (the correction or bonus token always)."""
    total, run = 1.0, 1.0
    for a in acceptance[:k]:
        run *= a
        total += run
    return total


class RoundCosts:
    """Running wall time of a round per (rows in the batch, drafts k); shared by the rows of one engine or
    one Speculation, so later requests start from what earlier ones measured."""

    def __init__(self):
        self.seconds: dict[tuple[int, int], float] = {}

    def add(self, rows: int, k: int, seconds: float) -> None:
        key = (rows, k)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else (1 - EMA) * old + EMA * seconds

    def get(self, rows: int, k: int) -> float | None:
        return self.seconds.get((rows, k))


def choose_k(costs: RoundCosts, rows: list[SpeculativeStats], limits: list[int], max_k: int) -> int:
    """The drafts per row for the next round of a batch: an untried k first (1..max_k, then 0 once, to know
    what plain decoding costs), else the k >= 1 with the most expected tokens per second over the batch's
    rows (limits[b]: row b's own cap, 0 when it does not draft). Whether drafting pays at all is `loses`'s
    call, per request."""
    B = len(rows)
    top = min(max_k, max(limits, default=0))
    if top <= 0:
        return 0
    for k in [*range(1, top + 1), 0]:
        if costs.get(B, k) is None:
            return k
    best, best_rate = 1, 0.0
    for k in range(1, top + 1):
        tokens = sum(expected_tokens(conditional_acceptance(s, min(k, lim)), min(k, lim))
                     for s, lim in zip(rows, limits))
        rate = tokens / costs.get(B, k)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def loses(costs: RoundCosts, stats: SpeculativeStats, batch: int, max_k: int) -> str | None:
    """Why drafting is a loss for this request (its best k yields fewer tokens per second than plain decoding
    at this batch size, by the measured times), or None while it pays or too little is measured."""
    if stats.rounds_drafting < MIN_ROUNDS_TO_TURN_OFF or costs.get(batch, 0) is None:
        return None
    plain = 1 / costs.get(batch, 0)
    rates = {k: expected_tokens(conditional_acceptance(stats, k), k) / costs.get(batch, k)
             for k in range(1, max_k + 1) if costs.get(batch, k) is not None}
    if not rates or max(rates.values()) >= plain:
        return None
    k = max(rates, key=rates.get)
    acc = stats.acceptance[0] if stats.acceptance else 0.0
    return (f"measured acceptance {acc:.2f} at position 1 makes drafting slower than plain decoding "
            f"(best k={k}: {rates[k]:.1f} vs {plain:.1f} tok/s)")
