"""The native CPU kernels' build (`avq.kernels.native`): once per host, atomic, and a clean fallback.

What they compute is tested with the other backend in tests/test_kernels.py (`compiled_backend`).
"""

from __future__ import annotations

import logging

import pytest
import torch

from avq.core.qweight import decode
from avq.kernels import compiled, native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache folder and no library loaded yet; the session's library is loaded again after."""
    monkeypatch.setenv("AVQ_CACHE_DIR", str(tmp_path))
    native.forget()
    yield tmp_path
    native.forget()


def test_the_library_is_built_once_into_the_cache_folder(fresh, monkeypatch) -> None:
    if native.compiler() is None:
        pytest.skip("no C compiler")
    lib = native.library()
    assert lib is not None and native.library() is lib
    built = list((fresh / "native").iterdir())
    assert [p.suffix for p in built] == [".so"]  # the library only: no temporary file left behind
    # a second process (here: after forget) loads the file and never compiles
    native.forget()
    monkeypatch.setattr(native, "build", lambda *a: pytest.fail("built again"))
    assert native.library() is not None
    # another source (or compiler, flags, CPU) is another file
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DAVQ_TEST"))
    assert native.library_path(native.compiler()) != built[0]


@pytest.mark.parametrize("cc", ["avq-no-such-compiler", "false"])
def test_without_a_working_compiler_the_kernels_fall_back_with_a_warning(
    fresh, monkeypatch, caplog, cc
) -> None:
    monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.WARNING, logger="avq"):
        assert native.library() is None
    assert "native CPU kernels are off" in caplog.text
    assert not (fresh / "native").exists() or not list((fresh / "native").iterdir())  # nothing half-written
    assert compiled.backend() == ("numba" if compiled.numba_available() else None)
    codes = torch.randint(0, 256, (8, 4, 2), dtype=torch.uint8)
    books, scales = torch.randn(2, 256, 8), torch.rand(8)
    out = torch.empty(8, 32)
    assert native.decoder(codes, books, scales) is None
    assert compiled.decode_into(codes, books, scales, out) == compiled.numba_available()


def test_avq_native_0_turns_them_off_quietly(fresh, monkeypatch, caplog) -> None:
    monkeypatch.setenv("AVQ_NATIVE", "0")
    with caplog.at_level(logging.WARNING, logger="avq"):
        assert native.library() is None
    assert caplog.text == ""


def test_the_native_decode_takes_what_it_can_and_declines_the_rest() -> None:
    if not native.available():
        pytest.skip("the native kernels do not build here")
    gen = torch.Generator().manual_seed(0)
    # each form of the decode, bit-identical: unrolled (M, g) cases, a constant group size with any
    # codebook count (on an accumulator), and anything else (summed in place), in both code dtypes
    for M, g in ((1, 2), (2, 2), (3, 8), (5, 4), (3, 5), (2, 24)):
        for nbits, dtype in ((8, torch.uint8), (12, torch.uint16)):
            codes = torch.randint(0, 1 << nbits, (5, 3, M), generator=gen).to(dtype)
            books, scales = torch.randn(M, 1 << nbits, g, generator=gen), torch.rand(5, generator=gen)
            out = torch.empty(5, 3 * g)
            native.decoder(codes, books, scales)(out)
            assert torch.equal(out, decode(codes, books, scales)), (M, g, nbits)
    assert native.decoder(codes.to(torch.int32), books, scales) is None  # not a stored code dtype
    assert native.decoder(codes, books.double(), scales) is None
    assert f"#define MAX_BOOKS {native.MAX_BOOKS}\n" in native.SOURCE.read_text()  # the two limits agree
    M = native.MAX_BOOKS + 1  # more codebooks than the kernel takes
    many = torch.zeros(2, 1, M, dtype=torch.uint8)
    assert native.decoder(many, torch.randn(M, 256, 4), torch.rand(2)) is None


def _loaded_openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[-1].strip() for line in f if "/" in line}
    return {p for p in paths if p.rsplit("/", 1)[-1].startswith(("libgomp.so.1", "libiomp", "libomp"))}


def test_the_native_threads_are_torchs_openmp_threads(fresh) -> None:
    """Built with OpenMP where torch's runtime is a libgomp.so.1, and then sharing it (threads of a second
    runtime, or our own, compete with torch's spinning ones for the cores)."""
    if native.compiler() is None:
        pytest.skip("no C compiler")
    before = _loaded_openmp_runtimes()
    assert native.library() is not None
    assert _loaded_openmp_runtimes() == before  # no second runtime loaded
    if native.openmp_flags():
        assert native.library_path(native.compiler(), openmp=True).exists()
        assert "-fopenmp" in native.flags() and "-fopenmp" not in native.flags(openmp=False)


def test_a_compiler_without_openmp_builds_without_it(fresh, monkeypatch) -> None:
    if native.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(native, "openmp_flags", lambda: ("-fno-such-openmp-flag",))
    assert native.library() is not None
    assert native.library_path(native.compiler(), openmp=False).exists()
    assert not native.library_path(native.compiler(), openmp=True).exists()
    codes = torch.randint(0, 256, (4, 2, 1), dtype=torch.uint8)
    books, scales = torch.randn(1, 256, 4), torch.rand(4)
    out = torch.empty(4, 8)
    native.decoder(codes, books, scales, parallel=True)(out)  # on POSIX threads
    assert torch.equal(out, decode(codes, books, scales))


def test_a_library_file_that_does_not_load_is_built_again(fresh) -> None:
    cc = native.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    path = native.library_path(cc)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")  # e.g. a disk that filled up under another tool
    assert native.library() is not None
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_the_native_gather_sum_reads_any_layout_and_declines_an_output_it_cannot_write() -> None:
    if not native.available():
        pytest.skip("the native kernels do not build here")
    gen = torch.Generator().manual_seed(1)
    R, blocks, N, per_block, C = 2, 3, 5, 4, 16
    lut = torch.randn(R, blocks * per_block * C, generator=gen)
    codes = torch.randint(0, C, (blocks, N, per_block), generator=gen).to(torch.uint8)
    k = torch.arange(per_block)
    # out[r, n] = sum over blocks b and lookups k of lut[r, (b*per_block + k)*C + codes[b, n, k]]
    index = (torch.arange(blocks)[:, None, None] * per_block + k) * C + codes.long()  # [blocks, N, per_block]
    expected = lut[:, index].sum(dim=(1, 3))  # [R, N]
    out = torch.zeros(R, N)
    column_major = lut.t().contiguous().t()
    codes_strided = codes.transpose(0, 1).contiguous().transpose(0, 1)
    assert not column_major.is_contiguous() and not codes_strided.is_contiguous()
    assert native.gather_sum(column_major, codes_strided, out)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    strided = torch.zeros(N, R).t()  # [R, N], not contiguous
    assert not native.gather_sum(lut, codes, strided) and not strided.any()
    assert not native.gather_sum(lut.double(), codes, out)


def test_the_native_transpose_writes_the_transpose_and_zeros_the_padding() -> None:
    """`native.transpose`: `dst[c, r] = src[r, c]` over a strided source (row length `ld_src`), zeros in
    the padding rows, nothing past `ld_dst` columns touched (odd sizes: partial 8x8 blocks)."""
    if not native.available():
        pytest.skip("no native library on this host")
    rows, cols, ld_src, ld_dst, pad = 13, 19, 21, 17, 16
    src = torch.randn(rows, ld_src)
    dst = torch.full((cols, ld_dst), 7.0)
    native.transpose(rows, cols, ld_src, ld_dst, pad)(src, dst)
    assert torch.equal(dst[:, :rows], src[:, :cols].t())
    assert torch.equal(dst[:, rows:pad], torch.zeros(cols, pad - rows))
    assert torch.equal(dst[:, pad:], torch.full((cols, ld_dst - pad), 7.0))
