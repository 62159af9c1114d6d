"""Simple byte-level mutations: bit flips, byte sets (random or interesting values), insertions, deletions,
chunk copies and splices with other corpus entries, stacked 1-4 at a time. Deterministic for a given RNG."""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["INTERESTING", "Mutator"]

INTERESTING = bytes([0, 1, 0x7F, 0x80, 0xFF, 0x10, 0x20, 0x40, 0x41, 0x42, 0x43, 0x30, 0x0A])


class Mutator:
    def __init__(self, rng: random.Random, *, max_len: int = 4096, dictionary: Sequence[bytes] = ()) -> None:
        self.rng = rng
        self.max_len = max_len
        self.dictionary = [bytes(d) for d in dictionary if d]

    def mutate(self, data: bytes, corpus: Sequence[bytes] = ()) -> bytes:
        rng = self.rng
        buf = bytearray(data or b"\0")
        for _ in range(1 << rng.randrange(3)):
            op = rng.randrange(8 if self.dictionary else 7)
            n = len(buf)
            if op == 0:                                     # flip a bit
                if n:
                    buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
            elif op == 1:                                   # set a random byte
                if n:
                    buf[rng.randrange(n)] = rng.randrange(256)
            elif op == 2:                                   # set an interesting byte
                if n:
                    buf[rng.randrange(n)] = INTERESTING[rng.randrange(len(INTERESTING))]
            elif op == 3:                                   # insert random bytes
                pos = rng.randrange(n + 1)
                buf[pos:pos] = rng.randbytes(1 + rng.randrange(8))
            elif op == 4:                                   # delete a range
                if n > 1:
                    pos = rng.randrange(n)
                    del buf[pos:pos + 1 + rng.randrange(min(8, n - pos))]
            elif op == 5:                                   # copy a chunk of itself elsewhere
                if n > 1:
                    src = rng.randrange(n)
                    length = 1 + rng.randrange(min(8, n - src))
                    dst = rng.randrange(n)
                    buf[dst:dst + length] = buf[src:src + length]
            elif op == 6:                                   # splice with another corpus entry
                if corpus:
                    other = corpus[rng.randrange(len(corpus))]
                    if other:
                        cut = rng.randrange(n + 1)
                        buf = buf[:cut] + other[rng.randrange(len(other)):]
            else:                                           # overwrite with a dictionary token
                token = self.dictionary[rng.randrange(len(self.dictionary))]
                pos = rng.randrange(n + 1)
                buf[pos:pos + len(token)] = token
        if len(buf) > self.max_len:
            del buf[self.max_len:]
        return bytes(buf)
