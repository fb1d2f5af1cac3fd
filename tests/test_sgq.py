"""edgelearn.sgq: round trips within the quantization bound, frame sizes, SGQ vs uniform error, the
Codec, every FrameError case (a corpus of hand-made bad frames) and argument errors."""

import struct
import zlib

import numpy as np
import pytest

import edgelearn
from edgelearn import sgq

HEADER = sgq.HEADER_BYTES


def features(rng, n=8, c=16, h=16, w=16):
    """Post-ReLU activations with per-channel scales spanning two orders of magnitude."""
    scales = np.geomspace(0.05, 5.0, c).astype(np.float32)
    rng.shuffle(scales)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32) * scales[None, :, None, None]
    return np.maximum(x, 0)


def f16_outward(lo, hi):
    lo16 = np.float16(lo)
    if np.float32(lo16) > lo:
        lo16 = np.nextafter(lo16, np.float16(-np.inf))
    hi16 = np.float16(hi)
    if np.float32(hi16) < hi:
        hi16 = np.nextafter(hi16, np.float16(np.inf))
    return np.float32(lo16), np.float32(hi16)


def reseal(frame):
    b = bytearray(frame)
    crc = zlib.crc32(bytes(b[:52]) + bytes(b[56:])) & 0xFFFFFFFF
    b[52:56] = struct.pack("<I", crc)
    return bytes(b)


def edit(frame, offset, fmt, *values, seal=True):
    b = bytearray(frame)
    struct.pack_into(fmt, b, offset, *values)
    return reseal(b) if seal else bytes(b)


# ---------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_round_trip_is_within_half_a_step(rng, bits):
    x = rng.standard_normal((3, 5, 7, 6)).astype(np.float32)
    y = sgq.decode(sgq.encode(x, bits=bits, mode="uniform"))
    lo, hi = f16_outward(x.min(), x.max())
    bound = (hi - lo) / (2**bits - 1) / 2
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.abs(y - x).max() <= bound * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_sgq_round_trip_is_within_the_block_bound(rng, bits, rounding):
    x = features(rng, n=2, c=6, h=8, w=5)
    frame = sgq.encode(x, bits=bits, group=3, stripe_rows=2, rounding=rounding, seed=7)
    y = sgq.decode(frame)
    # per-block bound from the order SGQ used (the frame carries it) and the blocks' outward f16 ranges
    order = sgq.channel_order(x)
    levels = 2**bits - 1
    for n in range(2):
        for g in range(2):
            chans = order[3 * g : 3 * g + 3]
            for s in range(4):
                blk = x[n, chans, 2 * s : 2 * s + 2]
                lo, hi = f16_outward(blk.min(), blk.max())
                step = (hi - lo) / levels
                err = np.abs(y[n, chans, 2 * s : 2 * s + 2] - blk).max()
                bound = step / 2 if rounding == "nearest" else step
                assert err <= bound * (1 + 1e-5) + 1e-6


def test_2d_and_3d_inputs_keep_their_shape(rng):
    for shape in [(4, 10), (3, 8, 12)]:
        x = rng.standard_normal(shape).astype(np.float32)
        frame = sgq.encode(x)
        assert sgq.decode(frame).shape == shape
        info = sgq.frame_info(frame)
        assert info["shape"] == shape
    assert sgq.frame_info(sgq.encode(rng.standard_normal((3, 8, 12)).astype(np.float32)))["stripe_rows"] == 3


def test_fp16_mode_matches_numpy_float16(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 100
    frame = sgq.encode(x, mode="fp16")
    assert len(frame) == HEADER + 2 * x.size
    np.testing.assert_array_equal(sgq.decode(frame), x.astype(np.float16).astype(np.float32))


def test_constant_tensor_round_trips_exactly():
    x = np.full((2, 4, 4, 4), 0.25, np.float32)
    for mode in sgq.MODES:
        np.testing.assert_array_equal(sgq.decode(sgq.encode(x, mode=mode)), x)


def test_stochastic_frames_are_reproducible_for_a_seed(rng):
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    a = sgq.encode(x, rounding="stochastic", seed=3)
    assert a == sgq.encode(x, rounding="stochastic", seed=3)
    assert a != sgq.encode(x, rounding="stochastic", seed=4)


def test_input_is_converted_from_float64_and_noncontiguous(rng):
    x = rng.standard_normal((2, 4, 8, 8))
    a = sgq.encode(x)
    assert a == sgq.encode(np.ascontiguousarray(x, dtype=np.float32))
    xt = np.asfortranarray(x.astype(np.float32))
    assert sgq.encode(xt) == a
    assert sgq.decode(bytearray(a)).shape == x.shape
    assert sgq.decode(memoryview(a)).shape == x.shape


# ---------------------------------------------------------------------------------------------------
# sizes and quality
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_frame_size_is_bits_per_element_plus_small_overhead(rng, bits):
    x = features(rng, n=8, c=32, h=16, w=16)
    frame = sgq.encode(x, bits=bits)
    info = sgq.frame_info(frame)
    assert info["codes_bytes"] == x.size * bits // 8
    assert info["frame_bytes"] == len(frame)
    groups, stripes = 32 // 4, 16 // 4
    assert info["ranges_bytes"] == 4 * 8 * groups * stripes
    assert info["permutation_bytes"] in (0, 2 * 32)
    per_element = len(frame) / x.size
    assert bits / 8 < per_element < bits / 8 * 1.1


def test_sgq_4bit_beats_uniform_4bit_at_no_more_bytes(rng):
    x = features(rng, n=16, c=32, h=16, w=16)
    s = sgq.encode(x, bits=4)
    u = sgq.encode(x, bits=4, mode="uniform")
    err = lambda f: np.linalg.norm(sgq.decode(f) - x) / np.linalg.norm(x)
    # same 4-bit code budget; SGQ's side information (ranges, order) is < 5% of the frame
    assert len(s) <= len(u) * 1.05
    assert err(s) < err(u) / 3, (err(s), err(u))
    # and at fewer bits: SGQ 3-bit (smaller frame than uniform 4-bit) still wins
    s3 = sgq.encode(x, bits=3)
    assert len(s3) < len(u) and err(s3) < err(u)


def test_channel_order_groups_similar_scales(rng):
    x = features(rng, n=4, c=16, h=8, w=8)
    order = sgq.channel_order(x)
    assert sorted(order) == list(range(16))
    widths = x.max(axis=(0, 2, 3)) - x.min(axis=(0, 2, 3))
    assert np.all(np.diff(widths[order]) >= 0)


# ---------------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------------


def test_codec_keeps_its_order_and_refreshes(rng):
    x = features(rng, n=2, c=8, h=8, w=8)
    codec = sgq.Codec(bits=4, refresh_every=None)
    f1 = codec.encode(x)
    kept = list(codec.order)
    x2 = x[:, ::-1].copy()
    codec.encode(x2)
    assert codec.order == kept  # not refreshed
    assert np.abs(codec.decode(f1) - x).max() < x.max() / 15
    codec.update_order(x2)
    assert codec.order == sgq.channel_order(x2)
    every = sgq.Codec(refresh_every=1)
    every.encode(x)
    every.encode(x2)
    assert every.order == sgq.channel_order(x2)
    assert "Codec(bits=4" in repr(codec)


def test_codec_stochastic_frames_differ_per_frame_but_are_reproducible(rng):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    a, b = sgq.Codec(rounding="stochastic", seed=1), sgq.Codec(rounding="stochastic", seed=1)
    fa = [a.encode(x) for _ in range(2)]
    fb = [b.encode(x) for _ in range(2)]
    assert fa == fb and fa[0] != fa[1]


def test_codec_baseline_modes(rng):
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    for mode in ("uniform", "fp16"):
        c = sgq.Codec(mode=mode)
        assert sgq.frame_info(c.encode(x))["mode"] == mode


# ---------------------------------------------------------------------------------------------------
# frame_info and FrameError (hand-made bad frames)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def good(rng):
    return sgq.encode(features(rng, n=2, c=6, h=3, w=5), bits=3, group=2, stripe_rows=2)  # 540 code bits


def test_frame_info_reports_the_header(good):
    info = sgq.frame_info(good)
    assert info["version"] == 1 and info["mode"] == "sgq" and info["bits"] == 3
    assert info["shape"] == (2, 6, 3, 5) and info["group"] == 2 and info["stripe_rows"] == 2
    assert info["rounding"] == "nearest" and info["dtype"] == "float32"
    assert info["crc32"] == zlib.crc32(good[:52] + good[56:])
    assert info["ranges_bytes"] == 4 * 2 * 3 * 2
    assert info["codes_bytes"] == (2 * 6 * 3 * 5 * 3 + 7) // 8


def test_frame_error_is_a_value_error():
    assert issubclass(sgq.FrameError, ValueError)
    assert edgelearn.sgq.FrameError is edgelearn._native.FrameError


BAD_FRAMES = {
    "empty": lambda g: b"",
    "short header": lambda g: g[:20],
    "truncated payload": lambda g: g[:-1],
    "trailing bytes": lambda g: g + b"\0",
    "bad magic": lambda g: edit(g, 0, "4s", b"JUNK"),
    "unknown version": lambda g: edit(g, 4, "<H", 2),
    "unknown dtype": lambda g: edit(g, 6, "B", 7),
    "unknown mode": lambda g: edit(g, 7, "B", 3),
    "bits zero": lambda g: edit(g, 8, "B", 0),
    "bits nine": lambda g: edit(g, 8, "B", 9),
    "unknown flag": lambda g: edit(g, 9, "B", 0x40),
    "bad ndim": lambda g: edit(g, 10, "B", 7),
    "ndim 2 with spatial dims": lambda g: edit(g, 10, "B", 2),
    "reserved byte": lambda g: edit(g, 11, "B", 1),
    "zero dimension": lambda g: edit(g, 12, "<I", 0),
    "absurd shape": lambda g: edit(g, 16, "<I", 0xFFFFFFFF),
    "absurd shape product": lambda g: b"".join(
        [g[:12], struct.pack("<4I", 65536, 65536, 65536, 65536), g[28:]]
    ),
    "shape disagrees with lengths": lambda g: edit(g, 12, "<I", 3),
    "group zero": lambda g: edit(g, 28, "<I", 0),
    "group too large": lambda g: edit(g, 28, "<I", 99),
    "stripe rows too large": lambda g: edit(g, 32, "<I", 5),
    "permutation length": lambda g: edit(g, 36, "<I", 4),
    "ranges length": lambda g: edit(g, 40, "<I", 0xFFFFFFFF),
    "codes length": lambda g: edit(g, 44, "<Q", 1 << 62),
    "wrong crc": lambda g: edit(g, 52, "<I", 0, seal=False) if g[52:56] != b"\0" * 4 else edit(g, 52, "<I", 1, seal=False),
    "payload bit flip": lambda g: g[:-3] + bytes([g[-3] ^ 0x10]) + g[-2:],
    "random bytes": lambda g: bytes(np.random.default_rng(0).integers(0, 256, len(g), dtype=np.uint8)),
    "nan range": lambda g: edit(g, HEADER + 12, "<HH", 0x7E00, 0x7E00),
    "inverted range": lambda g: edit(g, HEADER + 12, "<HH", 0x3C00, 0x0000),
    "repeated channel in permutation": lambda g: edit(g, HEADER + 2, "<H", struct.unpack_from("<H", g, HEADER)[0]),
    "nonzero padding bits": lambda g: reseal(g[:-1] + bytes([g[-1] | 0x80])),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_decode_rejects_malformed_frame(good, name):
    assert sgq.frame_info(good)["permutation"]  # the permutation cases need one
    bad = BAD_FRAMES[name](good)
    with pytest.raises(sgq.FrameError):
        sgq.decode(bad)
    with pytest.raises(sgq.FrameError):
        sgq.frame_info(bad)


def test_frame_error_messages_say_what_is_wrong(good):
    with pytest.raises(sgq.FrameError, match="magic"):
        sgq.decode(edit(good, 0, "4s", b"JUNK"))
    with pytest.raises(sgq.FrameError, match="CRC"):
        sgq.decode(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(sgq.FrameError, match="version"):
        sgq.decode(edit(good, 4, "<H", 9))


# ---------------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bits=0), ValueError, "bits"),
        (dict(bits=9), ValueError, "bits"),
        (dict(bits=4.0), TypeError, "bits"),
        (dict(group=0), ValueError, "group"),
        (dict(stripe_rows=0), ValueError, "stripe_rows"),
        (dict(rounding="up"), ValueError, "rounding"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=True), TypeError, "seed"),
        (dict(mode="int8"), ValueError, "mode"),
        (dict(mode="fp16", order=[0, 1, 2, 3]), ValueError, "order"),
        (dict(order=[0, 1, 1, 2]), ValueError, "order"),
        (dict(order=[0, 1]), ValueError, "order"),
    ],
)
def test_encode_argument_errors(rng, kwargs, exc, match):
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    with pytest.raises(exc, match=match):
        sgq.encode(x, **kwargs)


def test_encode_rejects_bad_arrays():
    with pytest.raises(TypeError, match="x"):
        sgq.encode([[1.0, 2.0]])
    with pytest.raises(TypeError, match="x"):
        sgq.encode(np.ones((2, 2, 2, 2), np.int32))
    with pytest.raises(ValueError, match="dimensions"):
        sgq.encode(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="dimensions"):
        sgq.encode(np.ones((1, 2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="no elements"):
        sgq.encode(np.ones((0, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        sgq.encode(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="binary16"):
        sgq.encode(np.array([[1.0, 1e6]], np.float32))
    with pytest.raises(TypeError, match="frame"):
        sgq.decode("not bytes")


def test_native_encode_checks_arguments_too(rng):
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="bits"):
        edgelearn._native._sgq_encode(x, "sgq", 0)
    with pytest.raises(ValueError, match="mode"):
        edgelearn._native._sgq_encode(x, "zip")
    with pytest.raises(ValueError, match="C-contiguous"):
        edgelearn._native._sgq_encode(x[:, :, ::2])
