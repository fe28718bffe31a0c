"""Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11) and the Box–Muller transform, in plain torch; the C++ kernel fastopt::philox_normal_ draws the same numbers.

The stream of a ``seed`` (the Philox key: its low and high 32 bits) is indexed by a 64-bit counter. A draw of n
numbers starting at counter c takes the counters c, c+1, …, c + 16·⌈n/64⌉ − 1 in groups of 16: group k gives the
64 numbers [64k, 64k + 64), element 64k + 16w + j being built from word w of counter c + 16k + j (the layout of
one AVX-512 register per word). With uᵥ = ((wordᵥ >> 9) + ½)·2⁻²³ (in (0, 1), never 0), the two pairs of words
give

    z₀ = r·cos θ,  z₁ = r·sin θ,  r = √(−2 ln u₀),  θ = 2π·u₁        (words 2, 3 likewise: z₂, z₃)

in float32. Any n numbers are a pure function of (seed, c), whatever the thread count or the device; the kernel and
this code agree to a few float32 ulps (their log / sin / cos are different approximations).
"""

from __future__ import annotations

import math

import torch

COUNTERS_PER_GROUP = 16
DRAWS_PER_GROUP = 4 * COUNTERS_PER_GROUP
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_BUMPS = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF


def _mulhilo(m: int, x):
    """(high, low) 32-bit halves of m·x for 32-bit m and x: Python ints or int64 tensors (the product is formed
    from 16-bit halves of x, so no intermediate exceeds 2⁴⁹)."""
    low, high = m * (x & 0xFFFF), m * (x >> 16)
    partial = low + ((high & 0xFFFF) << 16)
    return (high >> 16) + (partial >> 32), partial & _LOW32


def philox4x32_10(counter: tuple, key: tuple) -> tuple:
    """The four 32-bit output words of Philox4x32-10 for a counter of four 32-bit words and a key of two (Python
    ints, or int64 tensors holding 32-bit values, broadcast together)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_BUMPS[0]) & _LOW32, (k1 + _KEY_BUMPS[1]) & _LOW32
    return c0, c1, c2, c3


def check_draw(n: int, seed: int, counter: int) -> None:
    """Seed and counter in [0, 2⁶³), and the draw's last counter too."""
    for name, value in (("seed", seed), ("counter", counter), ("count", n)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
            raise ValueError(f"the noise stream's {name} must be an int in [0, 2**63), got {value!r}")
    if counter + counters_for(n) > 2 ** 63:
        raise ValueError(f"the noise stream's counter would pass 2**63 (counter {counter}, {n} numbers)")


def counters_for(n: int) -> int:
    """The counters a draw of n numbers takes."""
    return -(-n // DRAWS_PER_GROUP) * COUNTERS_PER_GROUP


def uniform(seed: int, counter: int) -> float:
    """One number in (0, 1) from word 0 of one counter (the uᵥ of the module docstring, in float64)."""
    check_draw(1, seed, counter)
    word = philox4x32_10((counter & _LOW32, counter >> 32, 0, 0), (seed & _LOW32, seed >> 32))[0]
    return ((word >> 9) + 0.5) / 2 ** 23


def philox_normal(n: int, seed: int, counter: int) -> torch.Tensor:
    """n standard normal float32 numbers of the stream ``seed`` from ``counter`` (module docstring), on the CPU."""
    check_draw(n, seed, counter)
    out = torch.empty(n)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        out[start:start + count] = _normal_groups(seed, counter + start // DRAWS_PER_GROUP * COUNTERS_PER_GROUP,
                                                  count)
    return out


# numbers per piece of a draw (whole groups): the int64 temporaries of the rounds stay in the caches (85M numbers on
# a 2-core Intel Xeon, one process: 3.0 s in pieces, 15.4 s in one piece, which also peaked at 3.3 GB)
_CHUNK = 1 << 18


def _normal_groups(seed: int, counter: int, n: int) -> torch.Tensor:
    index = counter + torch.arange(counters_for(n), dtype=torch.int64)
    words = philox4x32_10((index & _LOW32, index >> 32, 0, 0), (seed & _LOW32, seed >> 32))
    u = [((w >> 9).to(torch.float32) + 0.5) * 2.0 ** -23 for w in words]
    out = []
    for radius_word, angle_word in ((u[0], u[1]), (u[2], u[3])):
        r = torch.sqrt(-2.0 * torch.log(radius_word))
        theta = angle_word * (2 * math.pi)
        out += [r * torch.cos(theta), r * torch.sin(theta)]
    # (word, group, lane) -> element 64·group + 16·word + lane
    return torch.stack(out).view(4, -1, COUNTERS_PER_GROUP).transpose(0, 1).reshape(-1)[:n]


class PhiloxStream:
    """The stream of ``seed`` from ``counter``, which each draw advances (by ``counters_for(n)`` for n normal
    numbers, by 1 for a uniform one). ``get_state`` / ``set_state`` give and take the counter as a 0-d int64
    tensor, as a torch.Generator gives its state (the seed is the caller's)."""

    def __init__(self, seed: int, counter: int = 0):
        check_draw(0, seed, counter)
        self.seed, self.counter = seed, counter

    def normal(self, shape, draw=philox_normal) -> torch.Tensor:
        """float32 numbers of ``shape``; ``draw(n, seed, counter)`` computes them (this module's torch code, or a
        kernel that gives the same numbers)."""
        n = math.prod(shape)
        out = draw(n, self.seed, self.counter).view(shape)
        self.counter += counters_for(n)
        return out

    def uniform(self) -> float:
        u = uniform(self.seed, self.counter)
        self.counter += 1
        return u

    def get_state(self) -> torch.Tensor:
        return torch.tensor(self.counter, dtype=torch.int64)

    def set_state(self, state: torch.Tensor) -> None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or state.numel() != 1:
            raise ValueError(f"a Philox stream's state is its counter, a one-element int64 tensor; got {state!r}")
        counter = int(state)
        check_draw(0, self.seed, counter)
        self.counter = counter
