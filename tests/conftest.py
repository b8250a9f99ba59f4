"""Suite-wide setup.

Without CUDA the Triton kernels run under Triton's interpreter. `triton.jit` reads `TRITON_INTERPRET`
when a kernel is *defined*, so it must be set here, before any test module imports `avq.kernels`, for
the whole suite to see the same mode.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def kernel_choice_cache(tmp_path_factory):
    """Measured kernel choices (`avq.kernels.autotune`) go to a folder of this run, not the user's cache."""
    old = os.environ.get("AVQ_CACHE_DIR")
    os.environ["AVQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("avq-cache"))
    yield
    if old is None:
        os.environ.pop("AVQ_CACHE_DIR", None)
    else:
        os.environ["AVQ_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Whole tiny diffusers models run faster on one thread; on a loaded 2-core machine much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def use_compiled_backend(monkeypatch, name: str) -> None:
    """Make `name` ("native" or "numba") the backend of the compiled CPU kernels (`avq.kernels.compiled`)
    for this test, or skip it where that backend is missing here."""
    from avq.kernels import compiled, native

    if name == "native":
        if not native.available():
            pytest.skip("the native kernels do not build here (no C compiler)")
    else:
        if not compiled.numba_available():
            pytest.skip("numba is not installed")
        monkeypatch.setattr(native, "library", lambda: None)
    assert compiled.backend() == name


@pytest.fixture(params=["native", "numba"])
def compiled_backend(request, monkeypatch) -> str:
    """Each backend of the compiled CPU kernels in turn: the native C library (built once per test session
    into this run's cache folder), and numba with native turned off."""
    use_compiled_backend(monkeypatch, request.param)
    return request.param
