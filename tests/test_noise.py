"""Kron's counter-based noise: Philox4x32-10 (fastopt.reference.noise) on Random123's known answers, its normal
numbers' distribution, the stream's counter and state, and the C++ kernel fastopt::philox_normal_ against the
reference (every ISA build runs the cpu tests: test_cpu_build.py)."""

import math

import pytest
import torch

from fastopt import backends
from fastopt.ops.noise import philox_normal
from fastopt.reference import noise

# Random123's tests/kat_vectors, "philox4x32 10" lines: counter, key, output
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# n around the 64-number groups and past the reference's first piece (2^18); counters whose low word wraps inside a
# group, and past 2^32 and 2^62
DRAWS = [(0, 0, 0), (1, 0, 0), (63, 1, 2), (64, 5, 7), (65, 2 ** 40 + 3, 2 ** 32 - 20), (4097, 2 ** 62, 2 ** 33),
         (100_003, 12345, 2 ** 62 + 9), ((1 << 18) + 100, 6, 2 ** 31 + 5)]


@pytest.fixture
def kernel():
    assert backends.probe("cpu").available, backends.probe("cpu").reason


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert noise.philox4x32_10(counter, key) == expected
    words = noise.philox4x32_10(tuple(torch.tensor([c, 0, c], dtype=torch.int64) for c in counter), key)
    assert [w.tolist() for w in words] == [[e, noise.philox4x32_10((0,) * 4, key)[i], e]
                                           for i, e in enumerate(expected)]


def test_the_layout_of_the_equations():
    """Element 64k + 16w + j from word w of counter c + 16k + j: (w0, w1) and (w2, w3) by Box–Muller."""
    seed, counter = 77, 2 ** 32 - 3
    x = noise.philox_normal(130, seed, counter).double()
    assert x.shape == (130,) and x.dtype == torch.float64
    for element in (0, 17, 40, 63, 64, 100, 129):
        group, word, lane = element // 64, element % 64 // 16, element % 16
        c = counter + 16 * group + lane
        words = noise.philox4x32_10((c & 0xFFFFFFFF, c >> 32, 0, 0), (seed, 0))
        u = [((w >> 9) + 0.5) / 2 ** 23 for w in words]
        pair = word // 2 * 2
        r, theta = math.sqrt(-2 * math.log(u[pair])), 2 * math.pi * u[pair + 1]
        want = r * (math.cos(theta) if word % 2 == 0 else math.sin(theta))
        assert x[element].item() == pytest.approx(want, abs=2e-6)


@pytest.mark.parametrize("source", ["reference", "cpu"])
def test_draws_are_independent_standard_normals(source, request):
    """2^20 numbers: mean, variance, the largest gap to the normal CDF (Kolmogorov–Smirnov), and no correlation
    between neighbours or between the two halves of a Box–Muller pair; all deterministic (a fixed seed)."""
    if source == "cpu":
        request.getfixturevalue("kernel")
    n = 1 << 20
    x = philox_normal(n, 2024, 11, backend="torch" if source == "reference" else "cpu").double()
    assert abs(x.mean().item()) < 5 / math.sqrt(n) and abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    cdf = 0.5 * (1 + torch.erf(x.sort().values / math.sqrt(2)))
    gap = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert gap < 1.63 / math.sqrt(n)  # the 1% critical value
    pairs = x.view(-1, 4, 16)
    for a, b in ((x[:-1], x[1:]), (pairs[:, 0], pairs[:, 1]), (pairs[:, 2], pairs[:, 3]), (pairs[:, 0], pairs[:, 2])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 5 / math.sqrt(a.numel())


@pytest.mark.parametrize("n, seed, counter", DRAWS)
def test_cpu_kernel_matches_the_reference(kernel, n, seed, counter):
    """The same numbers to a few float32 ulps (SLEEF's log / sin / cos against torch's)."""
    got = philox_normal(n, seed, counter, backend="cpu")
    torch.testing.assert_close(got, noise.philox_normal(n, seed, counter), rtol=1e-6, atol=2e-6)


def test_cpu_kernel_is_independent_of_the_thread_count(kernel):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = philox_normal(300_001, 3, 5, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, philox_normal(300_001, 3, 5, backend="cpu"))
    assert torch.equal(one[:64 * 1000], philox_normal(64 * 1000, 3, 5, backend="cpu"))  # a prefix of whole groups


def test_cpu_kernel_refuses_what_it_cannot_draw(kernel):
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.fastopt.philox_normal_(torch.empty(8, dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.fastopt.philox_normal_(torch.empty(8, 2).mT, 0, 0)
    with pytest.raises(RuntimeError, match=r"\[0, 2\^63\)"):
        torch.ops.fastopt.philox_normal_(torch.empty(8), -1, 0)
    with pytest.raises(RuntimeError, match=r"\[0, 2\^63\)"):
        torch.ops.fastopt.philox_normal_(torch.empty(65), 0, 2 ** 63 - 20)


def test_stream_counter_and_state():
    """Each draw takes whole groups of counters (so a split draw equals one draw only at group boundaries); a
    uniform takes one counter; the state is the counter and restores the stream."""
    stream = noise.PhiloxStream(9)
    a = stream.normal((2, 50))
    assert stream.counter == 32
    b = stream.normal((3,))
    assert stream.counter == 48
    u = stream.uniform()
    assert stream.counter == 49 and 0 < u < 1 and u == noise.uniform(9, 48)
    assert torch.equal(torch.cat([a.flatten(), b]), torch.cat([noise.philox_normal(100, 9, 0),
                                                                noise.philox_normal(3, 9, 32)]))
    state = stream.get_state()
    c = stream.normal((70,))
    resumed = noise.PhiloxStream(9)
    resumed.set_state(state)
    assert torch.equal(resumed.normal((70,)), c) and resumed.counter == stream.counter == 49 + 32
    assert torch.equal(noise.PhiloxStream(9).normal((128,)), noise.philox_normal(128, 9, 0))


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2 ** 63), dict(seed=True), dict(seed=1.0),
                                 dict(counter=-5), dict(counter=2 ** 63 - 1, n=1)])
def test_bad_streams_are_refused(bad):
    args = dict(n=0, seed=0, counter=0) | bad
    with pytest.raises(ValueError, match="noise stream"):
        noise.philox_normal(args["n"], args["seed"], args["counter"])
    with pytest.raises(ValueError, match="noise stream"):
        philox_normal(args["n"], args["seed"], args["counter"], backend="cpu")


def test_bad_stream_states_are_refused():
    stream = noise.PhiloxStream(0)
    for state in (torch.tensor(1.0), torch.tensor([1, 2]), torch.tensor(-1), torch.ByteTensor(16)):
        with pytest.raises(ValueError):
            stream.set_state(state)
    with pytest.raises(ValueError, match="backend"):
        philox_normal(4, 0, 0, backend="cuda")
