"""Stop strings on a text stream: cut at the first one, holding back a tail that could begin one."""

from __future__ import annotations


class StopStrings:
    """Cuts the text stream at the first stop string; holds back what could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def feed(self, text: str, final: bool = False) -> str:
        if not self.stops:
            return text
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.hit = self.buf[:cut], "", True
            return out
        keep = 0 if final else max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])),
                                   default=0)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out
