import json
import platform
import shutil

import pytest
import torch

from vitscope import compiled
from vitscope.compiled import CompiledOrEager, private_code, reuse_vec_isa_probe


def _isa_probe_test_setup(monkeypatch, tmp_path):
    """Inductor's ISA settings, with its cache in tmp_path; skips where the probe does not apply."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the vector-ISA probe is x86's")
    from torch._inductor import config, cpp_builder, cpu_vec_isa
    if shutil.which(cpp_builder.get_cpp_compiler()) is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config.cpp, "vec_isa_ok", None)
    return config, cpu_vec_isa, compiled.claimed_vec_isas()


def test_the_vector_isa_probe_runs_once_and_its_result_is_reused(monkeypatch, tmp_path):
    config, cpu_vec_isa, claimed = _isa_probe_test_setup(monkeypatch, tmp_path)
    reuse_vec_isa_probe()  # the first process: inductor's probe runs, and its result is recorded
    [record] = tmp_path.glob("vitscope-vec-isa-*.json")
    found = json.loads(record.read_text())
    passed, checks = found["passed"], found["checks"]
    assert passed == sorted(str(isa) for isa in cpu_vec_isa.valid_vec_isa_list())
    assert config.cpp.vec_isa_ok is (True if passed == claimed else None)

    def no_probe():
        raise AssertionError("probed again")
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", no_probe)
    monkeypatch.setattr(config.cpp, "vec_isa_ok", None)  # a later process
    record.write_text(json.dumps({"passed": claimed, "checks": checks}))
    reuse_vec_isa_probe()
    assert config.cpp.vec_isa_ok is (True if claimed else None)

    monkeypatch.setattr(config.cpp, "vec_isa_ok", None)
    record.write_text(json.dumps({"passed": claimed[1:], "checks": checks}))  # one ISA failed: inductor decides
    reuse_vec_isa_probe()
    assert config.cpp.vec_isa_ok is None

    monkeypatch.setattr(config.cpp, "vec_isa_ok", False)  # the user's own setting stands
    record.write_text(json.dumps({"passed": claimed, "checks": checks}))
    reuse_vec_isa_probe()
    assert config.cpp.vec_isa_ok is False


def test_an_isa_check_that_passed_is_not_run_again_and_one_that_failed_is(monkeypatch):
    # AVX-512 BF16, VNNI and AMX each build and load a test library in a new process, whatever vec_isa_ok says.
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the vector-ISA probe is x86's")
    from torch._inductor import cpu_vec_isa
    calls = []

    def check_build(isa, code):  # stands in for inductor's: build, then load in a child process
        calls.append(code)
        return code == "passes"

    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", check_build)
    checks = compiled._recorded_checks(cpu_vec_isa, {})  # the first process
    isa = cpu_vec_isa.VecAVX2()
    assert isa.check_build("passes") and isa.check_build("passes")
    assert not isa.check_build("fails") and not isa.check_build("fails")
    assert calls == ["passes", "fails", "fails"] and list(checks.values()) == [True]

    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", check_build)  # a later process, given the record
    calls.clear()
    compiled._recorded_checks(cpu_vec_isa, dict(checks))
    assert isa.check_build("passes") and not isa.check_build("fails")
    assert calls == ["fails"]


def test_each_compiled_function_has_a_compile_cache_of_its_own():
    def scaled_by(k):
        def scale(x):
            return x * k  # k a constant to torch.compile: a graph per k
        return CompiledOrEager(scale)

    # One code object shared by both would make the second call a recompile of the first's graph.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert scaled_by(2)(torch.ones(2)).tolist() == [2, 2]
        assert scaled_by(3)(torch.ones(2)).tolist() == [3, 3]

    class Holder:
        def __init__(self, k):
            self.k = k

        def times(self, x, y=1):
            return x * self.k * y

    bound = Holder(5).times
    copy = private_code(bound)
    assert copy(2, y=3) == bound(2, y=3) == 30
    assert copy.__func__.__code__ is not bound.__func__.__code__ and copy.__self__ is bound.__self__


@pytest.mark.parametrize("version,kind,changed", [
    ("2.11.0+cu130", "cuda", ["loop_ordering_after_fusion"]),  # the torch that failed on an H100
    ("2.12.0", "cuda", []), ("2.13.0", "cuda", []), ("2.11.0", "cpu", [])])
def test_inductors_loop_reordering_is_turned_off_only_where_it_breaks_the_step(monkeypatch, version, kind, changed):
    from torch._inductor import config

    monkeypatch.setattr(torch, "__version__", version)
    with config.patch(loop_ordering_after_fusion=True):  # inductor's settings are restored by its own patch
        assert compiled.avoid_known_compiler_bugs(torch.device(kind)) == changed
        assert config.loop_ordering_after_fusion is not bool(changed)
