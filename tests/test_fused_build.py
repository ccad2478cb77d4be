"""The fused extension's build and load, in fresh processes (the load state is per
process): an unusable extension cache or a missing compiler never breaks the default
backend. ``auto`` warns once with the reason and runs on torch.nn, ``rnnkit info``
names the reason, ``backend="fused"`` raises with it. Also: the extension's name is
per environment and checkout, the build log's real cause is reported, and torch's
"No CUDA runtime" log line is dropped around the build."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from rnnkit.fused import _build

ROOT = str(Path(__file__).resolve().parent.parent)

# a default LSTM twice, then a GRU: the outputs equal torch.nn's, one warning in all, then an explicit fused layer
PROBE = r"""
import json, warnings, torch, rnnkit
torch.manual_seed(0)
x = torch.randn(5, 2, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lstm = rnnkit.LSTM(3, 4)
    ref = torch.nn.LSTM(3, 4)
    ref.load_state_dict(lstm.state_dict())
    out, (h, c) = lstm(x)
    out2, _ = lstm(x)
    gru = rnnkit.GRU(3, 4)
    gru(x)
    r_out, (r_h, r_c) = ref(x)
same = bool(torch.equal(out, r_out) and torch.equal(h, r_h) and torch.equal(c, r_c) and torch.equal(out2, r_out))
try:
    rnnkit.LSTM(3, 4, backend="fused")
    raised = None
except ValueError as e:
    raised = str(e)
print(json.dumps({"same": same, "backends": [lstm.last_backend, gru.last_backend], "raised": raised,
                  "warnings": [(w.category.__name__, str(w.message)) for w in caught]}))
"""


def _env(cache, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (_build.DISABLE_ENV, "CXX")}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               TORCH_EXTENSIONS_DIR=str(cache), **extra)
    return env


def _run(args, env, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _probe(env) -> dict:
    proc = _run(["-c", PROBE], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_falls_back(result: dict, reason_part: str) -> None:
    assert result["same"], "the default forward differs from torch.nn"
    assert result["backends"] == ["torch", "torch"]
    runtime = [msg for cat, msg in result["warnings"] if cat == "RuntimeWarning"]
    assert len(runtime) == 1, result["warnings"]
    assert "fused backend is unavailable" in runtime[0] and reason_part in runtime[0], runtime[0]
    assert result["raised"] is not None and "backend='fused' cannot run this configuration" in result["raised"]
    assert reason_part in result["raised"], result["raised"]


def _read_only_dir(tmp_path) -> Path:
    """A directory nobody here can create a folder in: a 0o555 folder, or, where the
    tests run as root (which ignores the mode), /sys (read-only for root too)."""
    ro = tmp_path / "read-only-cache"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/sys")):
        try:
            (candidate / "rnnkit-probe").mkdir()
        except OSError:
            return candidate
        (candidate / "rnnkit-probe").rmdir()
    pytest.skip("no read-only directory available (root without a read-only /sys)")


def _unusable_cache(kind: str, tmp_path) -> Path:
    if kind == "file":
        path = tmp_path / "cache-is-a-file"
        path.write_text("not a directory\n")
        return path
    return _read_only_dir(tmp_path)


@pytest.mark.parametrize("kind", ["read-only", "file"])
def test_unusable_cache_falls_back_with_one_warning(kind, tmp_path):
    cache = _unusable_cache(kind, tmp_path)
    try:
        result = _probe(_env(cache))
    finally:
        if cache.parent == tmp_path and cache.is_dir():
            cache.chmod(0o755)
    _check_falls_back(result, "extension cache is not usable")
    assert str(cache) in result["raised"] and "TORCH_EXTENSIONS_DIR" in result["raised"]


@pytest.mark.parametrize("kind", ["read-only", "file"])
def test_rnnkit_info_names_the_cache_problem(kind, tmp_path):
    cache = _unusable_cache(kind, tmp_path)
    try:
        proc = _run(["-m", "rnnkit", "info"], _env(cache))
    finally:
        if cache.parent == tmp_path and cache.is_dir():
            cache.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    fused = [line for line in proc.stdout.splitlines() if line.strip().startswith("fused ")]
    assert len(fused) == 1, proc.stdout
    assert "extension cache is not usable" in fused[0] and str(cache) in fused[0], fused[0]


@pytest.mark.parametrize("cache_state", ["empty", "unloadable library"])
def test_missing_compiler_reports_the_real_cause(cache_state, tmp_path):
    """CXX names no compiler: the reason is the shell's `not found` line, not ninja's
    "build stopped"; the compile message is printed because a compile was attempted,
    also when the cache holds a file of the extension's name that does not load."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cxx = str(tmp_path / "no-such-compiler")
    env = _env(cache, CXX=cxx)
    if cache_state == "unloadable library":
        name = _run(["-c", "from rnnkit.fused import _build; print(_build.extension_name())"], env).stdout.strip()
        assert name.startswith("rnnkit_fused_")
        folder = cache / name  # torch builds in <TORCH_EXTENSIONS_DIR>/<name>
        folder.mkdir()
        (folder / f"{name}.so").write_text("not a shared library\n")
    proc = _run(["-c", PROBE], env)
    assert proc.returncode == 0, proc.stderr
    assert "rnnkit: compiling the fused CPU kernels" in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    _check_falls_back(result, f"{cxx}: not found")
    assert "ninja: build stopped" not in result["raised"]


def test_first_error_line_skips_ninjas_summary():
    log = ("Error building extension 'rnnkit_fused_x': [1/2] /opt/cc -MMD -c fused.cpp -o fused.o\n"
           "FAILED: fused.o\n/opt/cc -MMD -c fused.cpp -o fused.o\n/bin/sh: 1: /opt/cc: not found\n"
           "ninja: build stopped: subcommand failed.\n")
    assert _build._first_error_line(log) == "/bin/sh: 1: /opt/cc: not found"
    assert _build._first_error_line("x.cpp:1:10: fatal error: y.h: No such file or directory\n") == \
        "x.cpp:1:10: fatal error: y.h: No such file or directory"
    assert _build._first_error_line("ninja: build stopped: subcommand failed.\n") == \
        "ninja: build stopped: subcommand failed."


def test_extension_name_is_per_environment_and_checkout(monkeypatch, tmp_path):
    name = _build.extension_name()
    assert name.startswith("rnnkit_fused_") and name.isidentifier()
    assert _build.extension_name() == name  # stable
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-another-env")
    assert _build.extension_name() != name
    monkeypatch.undo()
    copy = tmp_path / "other-checkout" / "csrc"
    copy.mkdir(parents=True)
    for path in _build.inputs():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(_build, "CSRC", copy)
    assert _build.extension_name() != name


def test_extension_name_does_not_hash_the_sources_the_calibration_key_does(monkeypatch, tmp_path):
    """An edit keeps the name (ninja rebuilds in place, incrementally) but changes source_hash,
    which keys auto's calibration cache, so a kernel change is measured afresh."""
    copy = tmp_path / "csrc"
    copy.mkdir()
    for path in _build.inputs():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(_build, "CSRC", copy)
    name, digest = _build.extension_name(), _build.source_hash()
    (copy / "gru.cpp").write_text((copy / "gru.cpp").read_text() + "// an edit\n")
    assert _build.extension_name() == name
    assert _build.source_hash() != digest


def test_the_source_list_is_the_csrc_folder():
    """Every .cpp in csrc/ is compiled and every header is watched (a file missing from the lists
    would be silently left out of the build or of the rebuild check)."""
    on_disk = sorted(p.name for p in _build.CSRC.iterdir() if p.suffix in (".cpp", ".h"))
    assert sorted(_build.SOURCE_FILES + _build.HEADER_FILES) == on_disk
    assert len(_build.SOURCE_FILES) >= 10 and "fused.cpp" not in on_disk  # one file per family, not one TU


def test_stale_inputs_names_what_changed_after_the_build(monkeypatch, tmp_path):
    copy = tmp_path / "csrc"
    copy.mkdir()
    for path in _build.inputs():
        (copy / path.name).write_bytes(path.read_bytes())
        os.utime(copy / path.name, (1_000_000, 1_000_000))
    monkeypatch.setattr(_build, "CSRC", copy)
    library = tmp_path / "lib.so"
    library.write_text("")
    os.utime(library, (2_000_000, 2_000_000))
    assert _build.stale_inputs(library) == []
    os.utime(copy / "lstm.cpp", (3_000_000, 3_000_000))
    os.utime(copy / "gates.h", (3_000_000, 3_000_000))
    assert _build.stale_inputs(library) == ["lstm.cpp", "gates.h"]


# a tiny extension in the layout of csrc/ (two sources and a header, no torch headers: it compiles in
# well under a second), built through _build's own path into a fresh cache
TINY = {
    "a.cpp": '#include "shared.h"\nint rnnkit_tiny_a() { return SHARED + 1; }\n',
    "b.cpp": ('#include <Python.h>\n#include "shared.h"\nint rnnkit_tiny_a();\n'
              "static PyModuleDef def_ = {PyModuleDef_HEAD_INIT, \"tiny\", nullptr, -1, nullptr};\n"
              "#define INIT2(n) PyInit_##n\n#define INIT(n) INIT2(n)\n"
              "PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) {\n"
              "  PyObject* m = PyModule_Create(&def_);\n"
              "  if (m) PyModule_AddIntConstant(m, \"value\", rnnkit_tiny_a() + SHARED);\n  return m;\n}\n"),
    "shared.h": "#pragma once\n#define SHARED 20\n",
}


def _objects_built(build_dir: Path) -> list:
    """The objects ninja compiled, in order, from its log (one line per command run, appended)."""
    log = (build_dir / ".ninja_log").read_text().splitlines()
    return [line.split("\t")[3] for line in log if not line.startswith("#") and line.split("\t")[3].endswith(".o")]


def test_the_build_is_incremental_and_always_announced(monkeypatch, tmp_path, capsys):
    src = tmp_path / "csrc"
    src.mkdir()
    for name, text in TINY.items():
        (src / name).write_text(text)
        os.utime(src / name, (1_000_000, 1_000_000))
    monkeypatch.setattr(_build, "CSRC", src)
    monkeypatch.setattr(_build, "SOURCE_FILES", ("a.cpp", "b.cpp"))
    monkeypatch.setattr(_build, "HEADER_FILES", ("shared.h",))
    monkeypatch.setattr(_build, "compile_flags", lambda: ["-O0"])
    monkeypatch.setattr(_build, "_state", dict(_build._state))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MAX_JOBS", "4")  # as many units as files: each compiles as itself
    monkeypatch.delenv("CXX", raising=False)

    def build():
        # a fresh process in effect: torch's in-process record of built extensions would skip the rebuild
        monkeypatch.setattr(cpp_extension.JIT_EXTENSION_VERSIONER, "entries", {})
        assert _build._build_and_load(verbose=False) is None
        return capsys.readouterr().err, _build._state["module"]

    err, module = build()  # cold: both objects
    assert "rnnkit: compiling the fused CPU kernels (once" in err and "ready (" in err
    assert module.value == 41
    build_dir = Path(_build._state["path"]).parent
    assert sorted(_objects_built(build_dir)) == ["a.o", "b.o"]

    err, _ = build()  # up to date: loaded, nothing compiled, nothing printed
    assert err == "" and len(_objects_built(build_dir)) == 2

    os.utime(src / "a.cpp")  # one source edited: announced with its name, only its object recompiles
    err, _ = build()
    assert "rnnkit: compiling the fused CPU kernels (a.cpp changed since the cached build" in err
    assert _objects_built(build_dir)[2:] == ["a.o"]

    os.utime(src / "shared.h")  # a header: every object that includes it
    err, _ = build()
    assert "shared.h changed" in err
    assert sorted(_objects_built(build_dir)[3:]) == ["a.o", "b.o"]


def test_one_core_compiles_one_unity_unit_and_an_edit_rebuilds_it(monkeypatch, tmp_path, capsys):
    """With one job the sources compile as one generated translation unit that #includes them
    (headers parsed once); an edit to one source recompiles that unit, and an unchanged unit file
    is not rewritten (its mtime would force a rebuild)."""
    src = tmp_path / "csrc"
    src.mkdir()
    for name, text in TINY.items():
        (src / name).write_text(text)
        os.utime(src / name, (1_000_000, 1_000_000))
    monkeypatch.setattr(_build, "CSRC", src)
    monkeypatch.setattr(_build, "SOURCE_FILES", ("a.cpp", "b.cpp"))
    monkeypatch.setattr(_build, "HEADER_FILES", ("shared.h",))
    monkeypatch.setattr(_build, "compile_flags", lambda: ["-O0"])
    monkeypatch.setattr(_build, "_state", dict(_build._state))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.delenv("CXX", raising=False)

    def build():
        monkeypatch.setattr(cpp_extension.JIT_EXTENSION_VERSIONER, "entries", {})
        assert _build._build_and_load(verbose=False) is None
        return capsys.readouterr().err, _build._state["module"]

    err, module = build()
    assert module.value == 41
    build_dir = Path(_build._state["path"]).parent
    assert _objects_built(build_dir) == ["unity_0.o"]
    unit = build_dir / "unity_0.cpp"
    assert [line for line in unit.read_text().splitlines() if line.startswith("#include")] == \
        [f'#include "{(src / "a.cpp").resolve()}"', f'#include "{(src / "b.cpp").resolve()}"']
    stamp = unit.stat().st_mtime_ns
    err, _ = build()  # up to date
    assert err == "" and _objects_built(build_dir) == ["unity_0.o"] and unit.stat().st_mtime_ns == stamp
    (src / "a.cpp").write_text(TINY["a.cpp"].replace("SHARED + 1", "SHARED + 2"))
    err, _ = build()
    assert "a.cpp changed" in err and _objects_built(build_dir) == ["unity_0.o", "unity_0.o"]
    assert unit.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("jobs", [1, 2, 3, 4, 8, 16])
def test_unity_groups_partition_the_sources(jobs):
    """Every source in exactly one unit, at most `jobs` units (and MAX_UNITS), the heavy files of
    an anchor never split, with enough cores register.cpp + aten.cpp (torch.library and ATen's op
    headers, the longest single compile) in a unit of their own, and on 2 cores two units whose
    estimated work differs by less than the largest kernel file's."""
    groups = _build.unity_groups(jobs)
    flat = [f for g in groups for f in g]
    assert sorted(flat) == sorted(_build.SOURCE_FILES) and len(flat) == len(set(flat))
    assert 1 <= len(groups) <= min(jobs, _build.MAX_UNITS) and all(groups)
    for anchor in _build.ANCHORS:
        assert sum(1 for g in groups if set(anchor) & set(g)) == 1, anchor
    if jobs >= 3:
        assert ["register.cpp", "aten.cpp"] in groups
    if jobs == 2:
        work = []
        for g in groups:
            anchor = [i for i, a in enumerate(_build.ANCHORS) if a[0] in g]
            work.append((_build.ANCHOR_SECONDS[anchor[0]] if anchor else _build.KERNEL_PARSE_SECONDS)
                        + sum(_build.CODE_SECONDS[f] for f in g if f in _build.CODE_SECONDS))
        assert len(work) == 2 and abs(work[0] - work[1]) < max(_build.CODE_SECONDS.values()), (groups, work)
    if jobs == 1:
        assert groups == [list(_build.SOURCE_FILES)]


def test_build_jobs_follows_max_jobs(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    assert _build.build_jobs() == 3
    monkeypatch.setenv("MAX_JOBS", "not a number")
    assert _build.build_jobs() >= 1
    monkeypatch.delenv("MAX_JOBS")
    assert _build.build_jobs() >= 1


def test_a_source_saved_during_the_build_is_rebuilt_next_time(monkeypatch, tmp_path):
    """The library is dated back to the build's start when a source changed while it ran, so
    stale_inputs names that source at the next load (instead of a library newer than it)."""
    src = tmp_path / "csrc"
    src.mkdir()
    for name, text in TINY.items():
        (src / name).write_text(text)
        os.utime(src / name, (1_000_000, 1_000_000))
    monkeypatch.setattr(_build, "CSRC", src)
    monkeypatch.setattr(_build, "SOURCE_FILES", ("a.cpp", "b.cpp"))
    monkeypatch.setattr(_build, "HEADER_FILES", ("shared.h",))
    library = tmp_path / "lib.so"
    library.write_text("")
    os.utime(library, (3_000_000, 3_000_000))  # the build finished at 3e6
    _build._date_before_edits_during_the_build(library, 2_000_000)  # began at 2e6; nothing edited since
    assert library.stat().st_mtime == 3_000_000 and _build.stale_inputs(library) == []
    os.utime(src / "b.cpp", (2_500_000, 2_500_000))  # saved while it ran
    assert _build.stale_inputs(library) == []  # what the mtime check alone would conclude
    _build._date_before_edits_during_the_build(library, 2_000_000)
    assert library.stat().st_mtime == 2_000_000 and _build.stale_inputs(library) == ["b.cpp"]


def test_no_cuda_runtime_log_is_dropped_around_the_build(monkeypatch):
    # A handler on the logger itself: torch's own logging setup (torch._logging, e.g. after
    # torch.compile ran in the same process) stops propagation at the "torch" logger, so
    # pytest's caplog (on the root logger) would see nothing whatever the filter does.
    logger = logging.getLogger("torch.utils.cpp_extension")
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    logger.addHandler(handler)
    try:
        with _build._quiet_cpp_extension_logs():
            logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
            logger.warning("something else")
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
    finally:
        logger.removeHandler(handler)
    assert records == ["something else", "No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'"]


def test_load_never_raises(monkeypatch):
    """Whatever fails inside the build (here: computing the name), load() returns a reason."""
    monkeypatch.delenv(_build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_build, "_state", {"loaded": False, "reason": None, "seconds": None, "path": None,
                                           "module": None})
    monkeypatch.setattr(_build, "_build_and_load", lambda verbose: 1 / 0)
    # as in a process where the kernels are not loaded yet (only _build's own name for torch is replaced)
    no_kernel = types.SimpleNamespace(_dispatch_has_kernel_for_dispatch_key=lambda op, key: False)
    monkeypatch.setattr(_build, "torch", types.SimpleNamespace(ops=types.SimpleNamespace(), _C=no_kernel))
    reason = _build.load()
    assert reason is not None and "ZeroDivisionError" in reason


FIRST_CALL = r"""
import json, sys, warnings
import torch
import rnnkit
from rnnkit.fused import _build
warnings.simplefilter("always")
first = sys.argv[1]
x = torch.randn(3, 2, 3)
with warnings.catch_warnings(record=True) as caught:
    if first == "export":  # the process's first call, with a dynamic length: the fused op in the graph
        from torch.export import Dim
        ind = rnnkit.IndRNN(3, 4)
        ep = torch.export.export(ind, (torch.randn(20, 8, 3),), dynamic_shapes=({0: Dim("L", min=2), 1: Dim("N")},))
        assert any("rnnkit_fused" in str(n.target) for n in ep.graph.nodes)
        y = torch.randn(31, 3, 3)
        assert torch.allclose(ep.module()(y)[0], ind(y)[0])
    elif first == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            reason = rnnkit.BACKENDS["fused"].unavailable()
            assert reason is None, reason
    elif first == "compile":
        torch._dynamo.config.allow_rnn = True
        m = rnnkit.GRU(3, 4)
        out = torch.compile(m, backend="eager", fullgraph=True)(x)[0]
        assert m.last_backend == "torch" and torch.allclose(out, m(x)[0], atol=1e-6)
later = rnnkit.LSTM(3, 4)
later(x)
print(json.dumps({"fused": rnnkit.describe_backends()["fused"], "later": later.last_backend,
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
"""


@pytest.mark.parametrize("first", ["export", "fake", "compile"])
def test_a_first_load_inside_export_fake_mode_or_compile_keeps_the_kernels(first):
    """The process's first use of the kernels inside torch.export or a FakeTensorMode: loading runs the
    extension's checks on real tensors (dispatch modes set aside), so it no longer fails (and with it the
    fused backend, for the rest of the process); torch.export (non-strict: no dynamo) loads them, so its
    graph holds the fused op and keeps the length dynamic (it ran the unrolled loop and fixed the length). Inside torch.compile(fullgraph=True) nothing loads (dynamo
    cannot trace the build): auto runs torch's op there, with no warning, and the next eager call loads."""
    if _build.load() is not None:
        pytest.skip(f"fused backend unavailable: {_build.load()}")
    env = {k: v for k, v in os.environ.items() if k != _build.DISABLE_ENV}  # this process's build cache: no rebuild
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = _run(["-c", FIRST_CALL, first], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"fused": "ready", "later": "fused", "warnings": []}, (result, proc.stderr[-2000:])
