"""Measured CPU kernel choice: timed once per key and host, the faster kept, remembered across processes."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from test_kernels import random_qweight

from avq import AQLinear, QuantSpec
from avq.kernels import autotune, choice, compiled, dense_cache, dispatch, lut, native, routes, weights

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = QuantSpec(2, 8, 8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVQ_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AVQ_KERNEL", raising=False)
    autotune.forget()
    yield tmp_path
    autotune.forget()


def _layer(seed: int = 0, shape=(96, 64)) -> AQLinear:
    return AQLinear(random_qweight(shape, SPEC, seed=seed), bias=torch.randn(shape[0])).eval()


def _sleepy(fn):
    """`fn`, 200 ms slower per call (far above either kernel's time on this tiny layer, even on a loaded
    machine)."""

    def slowed(*args, **kwargs):
        time.sleep(0.2)
        return fn(*args, **kwargs)

    return slowed


def _slow(monkeypatch, target, name: str, builds: bool = False) -> None:
    """Make `target.name` slow, or with `builds` the functions it builds (a kernel's prepared runner)."""
    original = getattr(target, name)
    if builds:
        monkeypatch.setattr(target, name, lambda *a, **k: _sleepy(original(*a, **k)))
    else:
        monkeypatch.setattr(target, name, _sleepy(original))


# kernel -> what its calls run: (module, function, whether that function builds the runner)
SLOW = {"lut": (dispatch, "_fused_runner", True), "dequant": (weights, "decoder", True),
        "dequant-blocked": (lut, "dequant_matmul", False)}  # fmt: skip


@pytest.mark.parametrize("fast", ["lut", "dequant", "dequant-blocked"])
@torch.no_grad()
def test_the_faster_kernel_is_measured_kept_and_reused(cache, monkeypatch, fast):
    layer, x = _layer(), torch.randn(1, 64)
    ref = F.linear(x, weights.dense_weight(layer, torch.float32).clone(), layer.bias)
    for kernel, (target, name, builds) in SLOW.items():
        if kernel != fast:
            _slow(monkeypatch, target, name, builds)
        elif builds:  # a slow preparation is paid once per route: it must not count against the kernel
            _slow(monkeypatch, target, name)
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    key = choice.measured_key(layer, x, 1)
    assert autotune.chosen(key) == fast
    saved = json.loads(autotune.cache_file().read_text())
    assert saved["host"] == autotune.host() and saved["choices"][key]["kernel"] == fast
    timings = saved["choices"][key]["ms"]
    assert set(timings) == set(SLOW) and min(timings, key=timings.get) == fast

    # later calls (and a new process, which reads the file) use it without measuring
    monkeypatch.setattr(autotune, "measure", lambda *a: pytest.fail("measured again"))
    autotune.forget()
    dispatch.invalidate(layer)  # its prepared forward too
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert routes.kernel_of(layer) == fast


@torch.no_grad()
def test_forced_kernels_and_float64_are_not_measured_and_many_rows_skip_the_lut(cache, monkeypatch):
    measured = []
    real = autotune.measure
    monkeypatch.setattr(autotune, "measure", lambda key, c: measured.append(sorted(c)) or real(key, c))
    layer = _layer()
    for forced in ("lut", "dequant"):
        monkeypatch.setenv("AVQ_KERNEL", forced)
        layer(torch.randn(1, 64))
    monkeypatch.delenv("AVQ_KERNEL")
    assert choice.measured_key(layer, torch.randn(1, 64, dtype=torch.float64), 1) is None
    layer.double()(torch.randn(1, 64, dtype=torch.float64))
    assert measured == [] and not autotune.cache_file().exists()
    layer.float()(torch.randn(65, 64))  # above MEASURE_MAX_ROWS: the whole decode against blocks
    fused = ["fused"] if native.available() else []  # (65 rows padded to 72)
    assert measured == [["dequant", "dequant-blocked", *fused]]


@torch.no_grad()
def test_large_convolutions_measure_whole_against_blocked_decode(cache, monkeypatch):
    """A conv whose weight spans several decode blocks times the whole decode against blocks of output
    channels (the same outputs); a small one is not measured."""
    from avq import AQConv2d

    monkeypatch.setattr(lut, "DEQUANT_BLOCK_BYTES", 4 * 16 * 72)  # 16 output channels of K = 8*3*3 a block
    conv = AQConv2d(random_qweight((40, 8, 3, 3), SPEC, seed=3), bias=torch.randn(40), padding=1).eval()
    x = torch.randn(2, 8, 6, 6)
    ref = F.conv2d(
        x, weights.dense_weight(conv, torch.float32).view(40, 8, 3, 3).clone(), conv.bias, padding=1
    )
    blocked = dispatch._conv_runner("dequant-blocked", conv, x)(x)
    torch.testing.assert_close(blocked, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        dispatch._conv_runner("dequant-blocked", conv, x)(x.to(memory_format=torch.channels_last)),
        ref,
        rtol=1e-5,
        atol=1e-5,
    )
    _slow(monkeypatch, weights, "decoder", builds=True)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    key = choice.conv_measured_key(conv, x, 2 * 36, choice.conv_candidates(conv, x))
    assert key.startswith("conv|cpu|") and "40x8x3x3" in key
    assert autotune.chosen(key) == "dequant-blocked"
    small = AQConv2d(random_qweight((8, 8, 3, 3), SPEC, seed=4), padding=1).eval()
    assert choice.conv_candidates(small, x) == ("dequant",)  # 6x6 outputs: not in runs of 8
    assert choice.conv_measured_key(small, x, 2 * 36, ("dequant",)) is None


@torch.no_grad()
def test_keys_bucket_rows_and_name_the_shape(cache):
    layer = _layer()
    keys = {r: choice.measured_key(layer, torch.randn(r, 64), r) for r in (1, 2, 3, 4, 5, 64)}
    assert keys[3] == keys[4] != keys[2] != keys[1] and keys[5] != keys[4]
    assert "96x64" in keys[1] and SPEC.name in keys[1] and "rows<=64" in keys[64]


@torch.no_grad()
def test_an_unreadable_cache_file_is_replaced(cache):
    autotune.cache_file().parent.mkdir(parents=True, exist_ok=True)
    autotune.cache_file().write_text("{not json")
    layer = _layer()
    layer(torch.randn(1, 64))
    data = json.loads(autotune.cache_file().read_text())
    assert len(data["choices"]) == 1


@torch.no_grad()
def test_dense_cache_keeps_decoded_weights_within_the_budget(cache, monkeypatch):
    """`AVQ_DENSE_CACHE_MIB`: decoded once and kept (rebuilt after a code edit), first come first served
    within the budget, the budget given back when a module dies; a bad value is refused by name."""
    first, second = _layer(1), _layer(2)  # 96x64 fp32: 24 KiB each
    monkeypatch.setenv("AVQ_DENSE_CACHE_MIB", str(30 / 1024))  # room for one
    monkeypatch.setattr(autotune, "chosen", lambda key: "dequant-blocked")  # no whole decodes: not counted
    decodes = []
    real = lut.dequantize
    monkeypatch.setattr(lut, "dequantize", lambda *a, **k: decodes.append(1) or real(*a, **k))
    x = torch.randn(3, 64)
    for layer in (first, second, first, second):
        ref = F.linear(x, layer.qweight.dequantize(), layer.bias)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert dense_cache.HELD[0] == 96 * 64 * 4 and first in dense_cache.OWNERS
    assert second not in dense_cache.OWNERS and len(decodes) == 1  # decoded once for two calls
    first.codes[0, 0, 0] = (int(first.codes[0, 0, 0]) + 1) % 256  # an edit (PV-Tuning): decoded again
    torch.testing.assert_close(
        first(x), F.linear(x, first.qweight.dequantize(), first.bias), rtol=1e-5, atol=1e-5
    )
    del first
    import gc

    gc.collect()
    assert dense_cache.HELD[0] == 0
    assert second(x) is not None and second in dense_cache.OWNERS  # the freed room is used
    monkeypatch.setenv("AVQ_DENSE_CACHE_MIB", "lots")
    with pytest.raises(ValueError, match="AVQ_DENSE_CACHE_MIB"):
        _layer(3)(x)


def test_hyperthread_siblings_are_counted_among_usable_cpus(tmp_path, monkeypatch):
    """Two usable CPUs that are one core's two threads count 2; siblings outside the affinity do not."""
    for cpu, siblings in {0: "0,2", 1: "1-1", 2: "0,2"}.items():
        folder = tmp_path / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(autotune, "SYSFS_CPU", tmp_path)
    monkeypatch.setattr(autotune.os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    assert autotune.hyperthreaded_cores() == 2
    monkeypatch.setattr(autotune.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert autotune.hyperthreaded_cores() == 0
    monkeypatch.setattr(autotune.os, "sched_getaffinity", lambda pid: {0, 7}, raising=False)  # no sysfs entry
    assert autotune.hyperthreaded_cores() == 0


@torch.no_grad()
def test_the_winner_is_timed_threaded_where_a_second_thread_might_pay(cache, monkeypatch, compiled_backend):
    """With two torch threads, fp32 input and a large enough weight, the measured winner is timed again
    against its variant on the compiled kernels' threads (`-mt`), which computes the same outputs bit for
    bit, and the faster is kept with both rounds' timings; one thread, a small weight or fp64: no threaded
    round."""
    threads_asked = []  # the native kernels' thread counts
    real_threads = native._threads
    monkeypatch.setattr(
        native, "_threads", lambda p: threads_asked.append(real_threads(p)) or threads_asked[-1]
    )
    layer, x = _layer(), torch.randn(1, 64)
    assert not choice.threadable(layer, x)  # one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not choice.threadable(layer, x)  # small weight
        monkeypatch.setattr(choice, "THREADED_MIN_WEIGHTS", 96 * 64)
        assert choice.threadable(layer, x) and not choice.threadable(layer, x.double())
        measured = []
        real = autotune.measure
        monkeypatch.setattr(autotune, "measure", lambda key, c: measured.append(sorted(c)) or real(key, c))
        ref = F.linear(x, layer.qweight.dequantize(), layer.bias)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        names = ["dequant", "dequant-blocked", "lut"]
        assert len(measured) == 2 and measured[0] == names
        first = measured[1][0]
        assert measured[1] == [first, first + "-mt"] and first in names
        key = choice.measured_key(layer, x, 1)
        entry = json.loads(autotune.cache_file().read_text())["choices"][key]
        assert entry["kernel"] in measured[1] and set(entry["ms"]) == {*names, first + "-mt"}
        assert routes.kernel_of(layer) == entry["kernel"]
        assert choice.split_threaded("dequant-blocked-mt") == ("dequant-blocked", True)
        for name in names:
            serial = dispatch._linear_runner(name, layer, x)(x)
            threaded = dispatch._linear_runner(name + "-mt", layer, x)(x)
            assert torch.equal(serial, threaded), name
        if compiled_backend == "numba":
            assert ("decode", 2, 256, 8, True) in compiled._COMPILED and (
                2,
                256,
                8,
                True,
            ) in compiled._COMPILED
        else:
            assert 2 in threads_asked and 1 in threads_asked
        # a later process reads the threaded choice back without measuring
        monkeypatch.setattr(autotune, "measure", lambda *a: pytest.fail("measured again"))
        autotune.forget()
        dispatch.invalidate(layer)
        choice._CHOSEN.pop(layer, None)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        assert routes.kernel_of(layer) == entry["kernel"]
    finally:
        torch.set_num_threads(threads)


def test_close_candidates_are_measured_longer(cache) -> None:
    """`REPEATS` rounds where one candidate is far ahead; where the two fastest are within `CLOSE`, more
    rounds up to `MAX_ROUNDS` (a burst of load must not decide a close call)."""
    calls: dict[str, int] = {}

    def sleeper(name: str, seconds: float):
        def run() -> torch.Tensor:
            calls[name] = calls.get(name, 0) + 1
            time.sleep(seconds)
            return torch.zeros(1)

        return run

    winner, _ = autotune.measure("far", {"fast": sleeper("fast", 0.001), "slow": sleeper("slow", 0.02)})
    assert winner == "fast" and calls == {"fast": 1 + autotune.REPEATS, "slow": 1 + autotune.REPEATS}
    calls.clear()
    autotune.measure("close", {"a": sleeper("a", 0.002), "b": sleeper("b", 0.002)})
    assert calls == {"a": 1 + autotune.MAX_ROUNDS, "b": 1 + autotune.MAX_ROUNDS}
    assert set(autotune.timings()["close"]) == {"a", "b"}
