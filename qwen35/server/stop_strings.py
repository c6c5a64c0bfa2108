"""Stop strings on a text stream: cut at the first one, holding back a tail that could begin one.

Each stop string is followed by its own Knuth-Morris-Pratt matcher, fed the stream a character at a time, so a
token costs time in its own length (amortized), never in the stop strings' length: testing every prefix of every
stop against the end of the buffer was quadratic in a stop's length, per token, on the event loop (four stop
strings of 500k characters held the server for 21 s).
"""

from __future__ import annotations


class _Matcher:
    """One stop string, matched incrementally: `k` is the length of the longest prefix of the stop that the text
    fed since the last reset ends with. The failure table grows only as far as `k` reaches, so a long stop string
    costs nothing up front (a request could bring several of them)."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fail = [0]  # fail[j]: the longest proper prefix of stop[: j + 1] that is also a suffix of it
        self.k = 0

    def _border(self, j: int) -> int:
        while len(self.fail) <= j:  # extend the table in order: entry i needs the ones before it
            i, b = len(self.fail), self.fail[-1]
            while b and self.stop[i] != self.stop[b]:
                b = self.fail[b - 1]
            self.fail.append(b + 1 if self.stop[i] == self.stop[b] else b)
        return self.fail[j]

    def scan(self, text: str) -> int:
        """Feed `text`; the index in it just past the stop's first complete occurrence, or -1."""
        s, k = self.stop, self.k
        for i, c in enumerate(text):
            while k and s[k] != c:
                k = self._border(k - 1)
            if s[k] == c:
                k += 1
                if k == len(s):
                    self.k = k
                    return i + 1
        self.k = k
        return -1


class StopStrings:
    """Cuts the text stream at the first stop string; holds back what could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.matchers = [_Matcher(s) for s in self.stops]
        self.buf = ""  # held back: the longest tail that is a proper prefix of some stop string
        self.hit = False

    def _reset(self) -> None:
        self.buf = ""
        for m in self.matchers:
            m.k = 0

    def feed(self, text: str, final: bool = False) -> str:
        if not self.stops:
            return text
        start = len(self.buf)
        self.buf += text
        # the held tail holds no stop string (it was searched before), so a match ends inside `text`; the
        # earliest start wins (a longer stop may start before a shorter one that ends first)
        ends = [(m.scan(text), len(m.stop)) for m in self.matchers]
        starts = [start + end - n for end, n in ends if end >= 0]
        if starts:
            out = self.buf[: min(starts)]
            self._reset()
            self.hit = True
            return out
        if final:
            out = self.buf
            self._reset()
            return out
        # each matcher's k is the longest suffix of the buffer that begins its stop (k never outgrows the
        # buffer: the buffer kept the longest of them last time, and k grows by at most one per new character)
        keep = max(m.k for m in self.matchers)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out
