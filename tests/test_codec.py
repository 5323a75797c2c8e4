"""The update codec: unbiased stochastic rounding, error bounds, the wire format, error feedback, hostile bodies.

The format is checked against `reference_decode`, an independent numpy reading of the documented layout;
rounding is checked by statistics over many seeds; `decode` is fuzzed with arbitrary and mutated bodies.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_runtime import codec
from edge_runtime.codec import CodecError, ErrorFeedback, decode, encode
from edge_runtime.errors import EdgeError

HEADER = struct.Struct("<4sBBBBIIII")  # written out here again on purpose: the test pins the documented layout
LEVELS = {8: 127, 4: 7}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def realistic_delta(n: int, seed: int = 0) -> np.ndarray:
    """Blocks of very different magnitudes (layers, biases) with heavy-ish tails and a few exact zeros."""
    g = rng(seed)
    x = g.standard_t(4, size=n) * np.repeat(10.0 ** g.uniform(-5, -1, size=n // 50 + 1), 50)[:n]
    x[g.integers(0, n, size=n // 20)] = 0.0
    return x.astype(np.float32)


def reference_decode(body: bytes) -> np.ndarray:
    """Read a body straight from the layout in codec's docstring, with numpy only."""
    magic, version, bits, flags, reserved, block, n, nb, crc = HEADER.unpack_from(body)
    assert (magic, version, reserved) == (b"FHUQ", 1, 0)
    assert zlib.crc32(body[: HEADER.size - 4] + body[HEADER.size :]) == crc
    payload = body[HEADER.size :]
    if flags & 1:
        payload = zstandard.ZstdDecompressor().decompress(payload)
    if bits == 32:
        return np.frombuffer(payload, "<f4").astype(np.float32)
    scales = np.frombuffer(payload[: 4 * nb], "<f4").astype(np.float64)
    raw = np.frombuffer(payload[4 * nb :], np.uint8)
    if bits == 8:
        q = raw.view(np.int8).astype(np.int64)
    else:
        nibbles = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[:n].astype(np.int64)
        q = np.where(nibbles >= 8, nibbles - 16, nibbles)
    assert q.size == n and nb == -(-n // block)
    # q * s is exact in float64 (<= 31 significant bits), so one rounding to float32: the float32 product.
    return (q * np.repeat(scales, block)[:n]).astype(np.float32)


def block_steps(x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Per element, the step of its block, max|x| / L, in float64 (independent of the codec)."""
    nb = -(-x.size // block)
    padded = np.zeros(nb * block)
    padded[: x.size] = np.abs(x.astype(np.float64))
    return np.repeat(padded.reshape(nb, block).max(axis=1) / LEVELS[bits], block)[: x.size]


def rebuild(body: bytes, payload: bytes | None = None, **fields: int) -> bytes:
    """`body` with some header fields (or the payload) replaced and a correct CRC: reaches the deeper checks."""
    names = ["magic", "version", "bits", "flags", "reserved", "block", "n", "nb", "crc"]
    values = dict(zip(names, HEADER.unpack_from(body), strict=True))
    values.update(fields)
    payload = body[HEADER.size :] if payload is None else payload
    head = HEADER.pack(*[values[k] for k in names[:-1]], 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head + payload)) + payload


# ------------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("n", [1, 2, 7, 255, 256, 257, 1001])
def test_decode_matches_the_reference_reading_of_the_format(n: int, bits: int, compress: bool) -> None:
    x = realistic_delta(n, seed=n)
    body = encode(x, bits, rng(n), block_size=64, compress=compress)
    out = decode(body, expected_n=n)
    assert out.dtype == np.float32 and out.shape == (n,) and out.flags.writeable
    np.testing.assert_array_equal(out, reference_decode(body))
    payload_size = {32: 4 * n, 8: 4 * -(-n // 64) + n, 4: 4 * -(-n // 64) + (n + 1) // 2}[bits]
    if not compress:
        assert len(body) == codec.HEADER_SIZE + payload_size


def test_layout_of_known_values() -> None:
    """Exact bytes for a vector on the grid: step 0.5, levels [7, -7, 1, -1, 0] in nibbles and in int8."""
    x4 = np.array([3.5, -3.5, 0.5, -0.5, 0.0], np.float32)  # max 3.5 = 7 * 0.5
    body4 = encode(x4, 4, rng(), block_size=8)
    assert HEADER.unpack_from(body4)[:8] == (b"FHUQ", 1, 4, 0, 0, 8, 5, 1)
    assert body4[HEADER.size :] == struct.pack("<f", 0.5) + bytes([0x97, 0xF1, 0x00])
    x8 = np.array([63.5, -63.5, 0.5, -0.5, 0.0], np.float32)  # max 63.5 = 127 * 0.5
    body8 = encode(x8, 8, rng(), block_size=8)
    assert body8[HEADER.size :] == struct.pack("<f", 0.5) + struct.pack("<5b", 127, -127, 1, -1, 0)
    body32 = encode(x8, 32, rng())
    assert HEADER.unpack_from(body32)[5:8] == (0, 5, 0)
    assert body32[HEADER.size :] == x8.astype("<f4").tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_32_bits_is_exact(compress: bool) -> None:
    x = realistic_delta(3001)
    x[:3] = [np.finfo(np.float32).max, -np.finfo(np.float32).tiny, 1e-45]
    np.testing.assert_array_equal(decode(encode(x, 32, rng(), compress=compress)), x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 999])
def test_values_on_the_grid_round_trip_exactly(bits: int, n: int) -> None:
    g = rng(n)
    top = LEVELS[bits]
    block = 16
    step = np.float32(2.0 ** g.integers(-20, 5, size=-(-n // block)))  # powers of two: k * step is exact
    k = g.integers(-top, top + 1, size=n)
    k[::block] = top * g.choice([-1, 1], size=k[::block].size)  # every block reaches +-top: its step is `step`
    x = (k * np.repeat(step, block)[:n]).astype(np.float32)
    for seed in range(5):
        np.testing.assert_array_equal(decode(encode(x, bits, rng(seed), block_size=block)), x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 3, 17, 255, 257])
def test_4bit_and_8bit_odd_lengths_and_zero_blocks(bits: int, n: int) -> None:
    x = realistic_delta(n, seed=3)
    x[: min(n, 16)] = 0.0  # an all-zero block: step 0, decoded exactly
    out = decode(encode(x, bits, rng(), block_size=16), expected_n=n)
    np.testing.assert_array_equal(out[: min(n, 16)], 0.0)
    assert np.all(np.abs(out - x) <= block_steps(x, bits, 16) * (1 + 1e-5))


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_zstd_on_and_off_decode_to_the_same_vector(bits: int) -> None:
    x = realistic_delta(20_000)
    plain, packed = encode(x, bits, rng(7)), encode(x, bits, rng(7), compress=True)
    assert HEADER.unpack_from(packed)[3] == codec.FLAG_ZSTD and HEADER.unpack_from(plain)[3] == 0
    np.testing.assert_array_equal(decode(plain), decode(packed))
    assert len(packed) < len(plain)  # these deltas have entropy to spare at every width


def test_same_seed_same_body_other_seed_other_rounding() -> None:
    x = realistic_delta(5000)
    assert encode(x, 8, rng(1)) == encode(x, 8, rng(1))
    assert encode(x, 8, rng(1)) != encode(x, 8, rng(2))


def test_non_contiguous_input_and_byte_like_bodies() -> None:
    x = realistic_delta(2000)
    body = encode(x[::2], 8, rng(), block_size=32)
    expected = reference_decode(body)
    for form in (body, bytearray(body), memoryview(body)):
        np.testing.assert_array_equal(decode(form), expected)


# ----------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937])
@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits: int, bit_generator: type[np.random.BitGenerator]) -> None:
    """The mean of k decodings converges to x like 1/sqrt(k), with no floor, at the predicted rate.

    Each element decodes to s*floor(x/s) or s*(floor(x/s)+1); unbiased means P(up) = frac(x/s), so its
    variance is s^2 p (1-p) and the RMS error of the k-mean is sqrt(mean variance / k). A bias would add
    a floor that does not shrink. MT19937 exercises the path for 32-bit bit generators.
    """
    n, block = 3001, 64
    x = realistic_delta(n, seed=11)
    s = block_steps(x, bits, block)
    y = np.divide(x, s, out=np.zeros(n), where=s > 0)
    p = y - np.floor(y)
    var = s**2 * p * (1 - p)
    s_safe = np.where(s > 0, s, 1.0)
    total = np.zeros(n)
    checkpoints = {16, 64, 256, 1024}
    ratios = {}
    for k in range(1, max(checkpoints) + 1):
        total += decode(encode(x, bits, np.random.Generator(bit_generator(k)), block_size=block))
        if k in checkpoints:
            err = total / k - x
            # In units of each element's step, so that every block weighs the same.
            err_steps, var_steps = err / s_safe, var / s_safe**2
            ratios[k] = np.sqrt(np.mean(err_steps**2) / (var_steps.mean() / k))
            # Systematic bias: the mean signed error, in standard errors of that mean.
            z = err_steps.mean() / np.sqrt(var_steps.mean() / k / n)
            assert abs(z) < 4.5, (k, z)
    assert all(0.85 < r < 1.15 for r in ratios.values()), ratios


FLOAT32 = np.finfo(np.float32)
EXTREMES = np.array([FLOAT32.max, -FLOAT32.max, FLOAT32.max * 0.999, 1e-45, -3e-45, FLOAT32.tiny, 0.0, 1.0], np.float32)


def check_within_one_step(x: np.ndarray, bits: int, block: int, seed: int) -> None:
    body = encode(x, bits, rng(seed), block_size=block)
    out = decode(body, expected_n=x.size)
    assert np.isfinite(out).all()
    step = block_steps(x, bits, block)
    # One step, plus one float32 rounding of q * s (half an ulp of up to L steps; absolute in subnormals).
    assert np.all(np.abs(out.astype(np.float64) - x) <= step * (1 + LEVELS[bits] * 2.0**-24) + 2.0**-149)
    # Each stored step covers its block (no clipping, hence no bias) unless capped to keep L * step a
    # finite float32, which only happens within an ulp of float32 max.
    nb = -(-x.size // block)
    reach = np.frombuffer(body[HEADER.size : HEADER.size + 4 * nb], "<f4").astype(np.float64) * LEVELS[bits]
    assert np.all((reach >= step[::block] * LEVELS[bits]) | (reach >= float(FLOAT32.max) * (1 - 2.0**-22)))
    assert np.all(reach <= FLOAT32.max)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [8, 16])
def test_extreme_values_stay_within_one_step(bits: int, block: int) -> None:
    for i in range(len(EXTREMES)):
        check_within_one_step(np.roll(EXTREMES, i), bits, block, seed=i)
        check_within_one_step(EXTREMES[i : i + 1].repeat(9), bits, block, seed=i)


@settings(max_examples=200, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(1, 600), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
    bits=st.sampled_from([8, 4]),
    block=st.integers(codec.MIN_BLOCK_SIZE, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_element_within_one_step_for_any_finite_vector(x: np.ndarray, bits: int, block: int, seed: int) -> None:
    check_within_one_step(x, bits, block, seed)


def test_max_block_error_matches_the_independent_bound() -> None:
    x = realistic_delta(1000)
    for bits in (8, 4):
        bound = codec.max_block_error(x, bits, 64)
        np.testing.assert_allclose(np.repeat(bound, 64)[:1000], block_steps(x, bits, 64), rtol=1e-6)
        err = np.abs(decode(encode(x, bits, rng(), block_size=64)) - x)
        assert np.all(err <= np.repeat(bound, 64)[:1000] * (1 + 1e-5))
    assert codec.levels(8) == 127 and codec.levels(4) == 7


# ----------------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("bits", [8, 4])
def test_error_feedback_keeps_the_running_sum_on_track(bits: int) -> None:
    """With feedback the coordinator's running sum trails the true one by the residual (< one step);
    without it, rounding noise adds up like a random walk."""
    n, rounds, block = 4000, 300, 64
    g = rng(5)
    ef = ErrorFeedback.zeros(n)
    true_sum, sent_sum, plain_sum = np.zeros(n), np.zeros(n), np.zeros(n)
    for t in range(rounds):
        delta = (g.standard_t(5, size=n) * 10.0 ** g.uniform(-3, -1)).astype(np.float32)
        step = block_steps((delta + (true_sum - sent_sum)).astype(np.float32), bits, block)
        compensated = ef.compensate(delta)
        decoded = decode(encode(compensated, bits, rng(t), block_size=block))
        ef.update(compensated, decoded)
        true_sum += delta
        sent_sum += decoded
        plain_sum += decode(encode(delta, bits, rng(10_000 + t), block_size=block))
        gap = true_sum - sent_sum
        assert np.all(np.abs(gap) <= step * 1.001 + 1e-9), t
        np.testing.assert_allclose(gap, ef.residual, atol=1e-6 * np.abs(true_sum).max() + 1e-9)
    ef_rms = np.sqrt(np.mean((true_sum - sent_sum) ** 2))
    plain_rms = np.sqrt(np.mean((true_sum - plain_sum) ** 2))
    assert plain_rms > 5 * ef_rms, (plain_rms, ef_rms)


def test_error_feedback_state_file_round_trip(tmp_path) -> None:
    ef = ErrorFeedback(realistic_delta(777))
    path = tmp_path / "residual.npy"
    ef.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = ErrorFeedback.load(path, expected_n=777)
    np.testing.assert_array_equal(loaded.residual, ef.residual)
    assert loaded.residual.dtype == np.float32 and loaded.n == 777


def test_error_feedback_refuses_bad_state(tmp_path) -> None:
    good = tmp_path / "good.npy"
    ErrorFeedback.zeros(10).save(good)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY\x01\x00garbage")
    archive = tmp_path / "archive.npy"
    with open(archive, "wb") as f:
        np.savez(f, residual=np.zeros(10, np.float32))
    wrong_dtype = tmp_path / "f64.npy"
    np.save(wrong_dtype, np.zeros(10))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full(10, np.nan, np.float32))
    cases = [(good, 11), (pickled, None), (garbage, None), (archive, None), (wrong_dtype, None), (nan, None)]
    for path, n in [*cases, (tmp_path / "missing.npy", None)]:
        with pytest.raises(CodecError) as info:
            ErrorFeedback.load(path, expected_n=n)
        assert info.value.code == "FHAI-C013", path
    ef = ErrorFeedback.zeros(10)
    for bad in (np.zeros(9, np.float32), np.zeros(10), np.full(10, np.inf, np.float32)):
        with pytest.raises(CodecError):
            ef.compensate(bad)
        with pytest.raises(CodecError):
            ef.update(np.zeros(10, np.float32), bad)


# ------------------------------------------------------------------------------------------ encode inputs


@pytest.mark.parametrize(
    ("delta", "bits", "kwargs"),
    [
        (np.array([1.0, np.nan], np.float32), 8, {}),
        (np.array([1.0, np.inf], np.float32), 4, {}),
        (np.array([1.0, -np.inf], np.float32), 32, {}),
        (np.zeros(4), 8, {}),  # float64
        (np.zeros(4, np.int32), 8, {}),
        (np.zeros((2, 2), np.float32), 8, {}),
        (np.zeros(0, np.float32), 8, {}),
        ([0.0, 1.0], 8, {}),
        (np.zeros(4, np.float32), 3, {}),
        (np.zeros(4, np.float32), 16, {}),
        (np.zeros(4, np.float32), True, {}),
        (np.zeros(4, np.float32), 8, {"block_size": 0}),
        (np.zeros(4, np.float32), 8, {"block_size": codec.MIN_BLOCK_SIZE - 1}),
        (np.zeros(4, np.float32), 8, {"block_size": codec.MAX_BLOCK_SIZE + 1}),
        (np.zeros(4, np.float32), 4, {"block_size": 64.0}),
        (np.zeros(4, np.float32), 4, {"block_size": "256"}),
        (np.zeros(4, np.float32), 8, {"rng": None}),
        (np.zeros(4, np.float32), 8, {"rng": np.random.RandomState(0)}),
    ],
)
def test_encode_refuses_bad_input(delta: np.ndarray, bits: int, kwargs: dict) -> None:
    kwargs = {"rng": rng(), **kwargs}
    with pytest.raises(CodecError) as info:
        encode(delta, bits, **kwargs)
    assert info.value.code in {"FHAI-C011", "FHAI-C012"}
    assert isinstance(info.value, EdgeError)


# ------------------------------------------------------------------------------------------ decode checks

BODY8 = encode(realistic_delta(1000), 8, rng(), block_size=64)
BODY4 = encode(realistic_delta(777), 4, rng(), block_size=64)
BODY32 = encode(realistic_delta(50), 32, rng())
BODY8Z = encode(realistic_delta(1000), 8, rng(), block_size=64, compress=True)
BODY4Z = encode(realistic_delta(777), 4, rng(), block_size=64, compress=True)
BODIES = [BODY8, BODY4, BODY32, BODY8Z, BODY4Z]


def _scales_payload(body: bytes, scales: list[float]) -> bytes:
    return np.array(scales, "<f4").tobytes() + body[HEADER.size + 4 * len(scales) :]


def _zstd(data: bytes, **kw: object) -> bytes:
    return zstandard.ZstdCompressor(**kw).compress(data)  # type: ignore[arg-type]


def _bad_bodies() -> list[tuple[str, object, str, dict]]:
    h = HEADER.size
    nb8 = -(-1000 // 64)
    scales8 = list(np.frombuffer(BODY8[h : h + 4 * nb8], "<f4"))
    level_m128 = BODY8[: h + 4 * nb8] + b"\x80" + BODY8[h + 4 * nb8 + 1 :]
    nib_8 = BODY4[: h + 4 * 13] + b"\x08" + BODY4[h + 4 * 13 + 1 :]
    pad = BODY4[:-1] + bytes([BODY4[-1] | 0x10])
    payload8 = BODY8[h:]
    return [
        ("not bytes", "FHUQ", "FHAI-C001", {}),
        ("none", None, "FHAI-C001", {}),
        ("empty", b"", "FHAI-C001", {}),
        ("short", BODY8[:10], "FHAI-C001", {}),
        ("magic", b"XXXX" + BODY8[4:], "FHAI-C001", {}),
        ("version", rebuild(BODY8, version=2), "FHAI-C002", {}),
        ("flags", rebuild(BODY8, flags=0x02), "FHAI-C002", {}),
        ("reserved", rebuild(BODY8, reserved=1), "FHAI-C002", {}),
        ("bits 3", rebuild(BODY8, bits=3), "FHAI-C003", {}),
        ("bits 16", rebuild(BODY8, bits=16), "FHAI-C003", {}),
        ("block 0", rebuild(BODY8, block=0), "FHAI-C004", {}),
        ("block 4", rebuild(BODY8, block=4), "FHAI-C004", {}),
        ("block huge", rebuild(BODY8, block=1 << 20), "FHAI-C004", {}),
        ("n blocks", rebuild(BODY8, nb=nb8 + 1), "FHAI-C004", {}),
        ("32 with blocks", rebuild(BODY32, block=64, nb=1), "FHAI-C004", {}),
        ("n zero", rebuild(BODY8, n=0, nb=0), "FHAI-C005", {}),
        ("expected n", BODY8, "FHAI-C005", {"expected_n": 999}),
        ("n and blocks both off", rebuild(BODY8, n=1001), "FHAI-C001", {}),
        ("truncated payload", rebuild(BODY8, payload=payload8[:-1]), "FHAI-C001", {}),
        ("extra payload", rebuild(BODY8, payload=payload8 + b"\0"), "FHAI-C001", {}),
        ("truncated raw", BODY8[:-1], "FHAI-C008", {}),
        ("flipped value", BODY8[:-1] + bytes([BODY8[-1] ^ 1]), "FHAI-C008", {}),
        ("flipped crc", BODY8[:20] + bytes([BODY8[20] ^ 1]) + BODY8[21:], "FHAI-C008", {}),
        ("nan scale", rebuild(BODY8, payload=_scales_payload(BODY8, [np.nan, *scales8[1:]])), "FHAI-C006", {}),
        ("inf scale", rebuild(BODY8, payload=_scales_payload(BODY8, [*scales8[:-1], np.inf])), "FHAI-C006", {}),
        ("negative scale", rebuild(BODY8, payload=_scales_payload(BODY8, [-1.0, *scales8[1:]])), "FHAI-C006", {}),
        ("overflowing scale", rebuild(BODY8, payload=_scales_payload(BODY8, [1e37, *scales8[1:]])), "FHAI-C006", {}),
        ("level -128", rebuild(level_m128), "FHAI-C007", {}),
        ("nibble -8", rebuild(nib_8), "FHAI-C007", {}),
        ("padding nibble", rebuild(pad), "FHAI-C007", {}),
        ("nan in 32", rebuild(BODY32, payload=b"\x00\x00\xc0\x7f" + BODY32[h + 4 :]), "FHAI-C007", {}),
        ("body too big", BODY8, "FHAI-C010", {"max_bytes": len(BODY8) - 1}),
        ("n too big", rebuild(BODY32, n=2**30), "FHAI-C010", {}),
        # zstd: the frame must declare exactly the size the header implies, hold one frame and nothing else.
        ("zstd bomb", rebuild(BODY32, flags=1, payload=_zstd(bytes(10_000_000))), "FHAI-C009", {}),
        ("zstd no size", rebuild(BODY8Z, payload=_zstd(payload8, write_content_size=False)), "FHAI-C009", {}),
        ("zstd not zstd", rebuild(BODY8, flags=1), "FHAI-C009", {}),
        ("zstd trailing", rebuild(BODY8Z, payload=BODY8Z[h:] + b"\0"), "FHAI-C009", {}),
        ("zstd two frames", rebuild(BODY8Z, payload=BODY8Z[h:] + BODY8Z[h:]), "FHAI-C009", {}),
        ("zstd lies", rebuild(BODY8Z, payload=_lying_frame(payload8 + b"extra", len(payload8))), "FHAI-C009", {}),
        ("zstd short", rebuild(BODY8Z, payload=_zstd(payload8[:-1])), "FHAI-C009", {}),
        ("zstd truncated", rebuild(BODY8Z, payload=BODY8Z[h:-3]), "FHAI-C009", {}),
    ]


def _lying_frame(data: bytes, claimed: int) -> bytes:
    """A zstd frame of `data` whose header claims `claimed` bytes instead."""
    frame = bytearray(_zstd(data))
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    size_bytes = [single_segment, 2, 4, 8][descriptor >> 6]
    offset = 5 + (0 if single_segment else 1) + [0, 1, 2, 4][descriptor & 3]
    value = claimed - 256 if size_bytes == 2 else claimed
    frame[offset : offset + size_bytes] = value.to_bytes(size_bytes, "little")
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == claimed
    return bytes(frame)


@pytest.mark.parametrize(
    ("name", "body", "code", "kwargs"), _bad_bodies(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_decode_refuses_with_a_stable_code(name: str, body: bytes, code: str, kwargs: dict) -> None:
    with pytest.raises(CodecError) as info:
        decode(body, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == code, (name, info.value)
    assert info.value.message


def test_zstd_bomb_is_refused_before_decompressing() -> None:
    """A 50 MB frame of zeros (a few kB) behind a header of 50 float32: refused without allocating 50 MB."""
    bomb = rebuild(BODY32, flags=codec.FLAG_ZSTD, payload=_zstd(bytes(50_000_000)))
    assert len(bomb) < 10_000
    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as info:
            decode(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == "FHAI-C009"
    assert peak < 1_000_000


def test_valid_bodies_decode() -> None:
    for body in BODIES:
        np.testing.assert_array_equal(decode(body), reference_decode(body))


# ------------------------------------------------------------------------------------------------- fuzzing


def _decode_or_none(body: bytes) -> np.ndarray | None:
    """decode, with CodecError as None: any other exception fails the test."""
    try:
        out = decode(body)
    except CodecError:
        return None
    assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
    return out


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    assert _decode_or_none(data) is None


@FUZZ
@given(st.data(), st.sampled_from([BODY8, BODY4, BODY32]))
def test_fuzz_arbitrary_payloads_behind_a_valid_header(data: st.DataObject, body: bytes) -> None:
    """Random payload bytes, mostly of exactly the right length, so the scale and level checks are reached."""
    size = len(body) - HEADER.size
    payload = data.draw(st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=2 * size)))
    flags = data.draw(st.sampled_from([0, 0, 0, codec.FLAG_ZSTD]))
    out = _decode_or_none(rebuild(body, payload=payload, flags=flags))
    assert out is None or out.size == HEADER.unpack_from(body)[6]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """(original, mutated, crc_fixed): truncations, flips, insertions, header fields, fixed-up CRCs."""
    body = draw(st.sampled_from(BODIES))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "field", "payload flip"]))
    if kind == "truncate":
        return body, body[: draw(st.integers(0, len(body) - 1))], False
    if kind == "flip":
        i = draw(st.integers(0, len(body) - 1))
        return body, body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :], False
    if kind == "insert":
        i = draw(st.integers(0, len(body)))
        return body, body[:i] + draw(st.binary(min_size=1, max_size=8)) + body[i:], False
    if kind == "field":
        name = draw(st.sampled_from(["version", "bits", "flags", "reserved", "block", "n", "nb"]))
        limit = 255 if name in ("version", "bits", "flags", "reserved") else 2**32 - 1
        current = {"version": 1, "bits": 2, "flags": 3, "reserved": 4, "block": 5, "n": 6, "nb": 7}[name]
        old = HEADER.unpack_from(body)[current]
        special = st.sampled_from([0, 1, 4, 8, 32, 255, old - 1, old + 1, old * 2, limit])
        value = draw(st.one_of(special, st.integers(0, limit)).filter(lambda v: 0 <= v <= limit))
        return body, rebuild(body, **{name: value}), True
    payload = bytearray(body[HEADER.size :])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(payload) - 1))
        payload[i] ^= draw(st.integers(1, 255))
    return body, rebuild(body, payload=bytes(payload)), True


@FUZZ
@given(mutated())
def test_fuzz_mutated_valid_bodies(case: tuple[bytes, bytes, bool]) -> None:
    """Any change is refused, unless it leaves the vector as it was; with the CRC fixed up (an attacker,
    or a bug upstream of the checksum) decode still only returns a finite vector of the declared size."""
    original, body, crc_fixed = case
    out = _decode_or_none(body)
    if out is None or body == original:
        return
    if crc_fixed:
        assert out.size == HEADER.unpack_from(body)[6]
    else:
        np.testing.assert_array_equal(out, decode(original))
