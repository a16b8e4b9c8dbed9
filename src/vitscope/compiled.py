"""torch.compile for vitscope's steps: compile on the first call and fall back to eager where it fails
(`CompiledOrEager`), keep a compiled step on disk for later processes (`precompiled`), and spare each process
the compiler's CPU probes (`reuse_vec_isa_probe`). Everything it writes lives beside torch's own compile cache.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import torch

from .cpu_kernels import VERSION as kernel_ops_version
from .files import atomic_write


def avoid_known_compiler_bugs(device: torch.device) -> list[str]:
    """Turn off what is known to break torch.compile for vitscope's steps on this torch and device; returns the
    inductor settings changed (process-wide, as inductor's settings are).

    torch before 2.12 on CUDA: inductor's loop reordering after fusion fails an assertion on a graph that mixes
    `_foreach_*` ops with reductions over tensors of different shapes (pytorch/pytorch#176591, fixed by #176849),
    as every optimizer update of vitscope's does. Seen on an H100 with torch 2.11.0+cu130: every compiled step
    failed and training ran eagerly (docs/performance.md#compile-failure-on-cuda-before-torch-212). That pass
    is an optimisation; the step compiles without it. A CPU skips the pass anyway."""
    from torch._inductor import config
    from torch.torch_version import TorchVersion

    changed = []
    if device.type == "cuda" and TorchVersion(torch.__version__) < (2, 12) \
            and getattr(config, "loop_ordering_after_fusion", False):
        config.loop_ordering_after_fusion = False
        changed.append("loop_ordering_after_fusion")
    return changed


def error_summary(error: Exception) -> str:
    """An exception's type and the first line of its message (at most 200 characters), for a one-line warning."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


class CompiledOrEager:
    """`fn` through torch.compile, which compiles on the first call and fails there if it cannot (no C++
    compiler, an unsupported platform): then a warning, and plain `fn` from then on (a real error in `fn`
    raises again from the plain call).

    Each instance compiles its own copy of `fn`'s code (`private_code`): torch.compile keeps its graphs per
    code object, so the steps of two models built from one function would share them. Every call would then
    check the other model's guards first, and past torch's recompile limit (8 models in one process) the
    rest would run uncompiled.

    With `saved_as` (for a bound method: a string naming whatever the method reads from its object that the
    compiled code depends on), the compiled function is also kept on disk and later processes load it
    (`precompiled`): no tracing at all. `self.source` then says where the code came from. A file that loads
    but fails at its first call (one saved by other code under the same name) is deleted, with a warning, and
    the step compiled the usual way. Such a function
    checks its guards (every tensor's metadata, every constant) at each call; with `fingerprint`, a
    function of the call's arguments that changes whenever anything the guards check could, it checks them
    only when the fingerprint is new (checking them costs a noticeable share of a small step;
    docs/performance.md#compiling)."""

    def __init__(self, fn, saved_as: str | None = None, fingerprint=None):
        self.fn, self.call, self.untried = fn, torch.compile(private_code(fn)), True
        self.saved_as, self.source, self.fingerprint = saved_as, None, fingerprint
        self.first_call_seconds = None

    def __call__(self, *args, **kwargs):
        if not self.untried:
            return self.call(*args, **kwargs)
        self.untried = False
        start = time.perf_counter()
        try:
            return self._first_call(*args, **kwargs)
        finally:
            self.first_call_seconds = time.perf_counter() - start

    def describe(self) -> str:
        """Where the compiled code came from and what its first call cost, in words for the training log."""
        seconds = f"{self.first_call_seconds:.1f} s" if self.first_call_seconds is not None else "?"
        return {"loaded": f"compiled step loaded from the compile cache; its first call took {seconds}",
                "saved": f"step compiled in {seconds} and saved: later runs of this config load it",
                "compiled": f"step compiled in {seconds} (the first call's tracing and compilation)",
                "eager": "torch.compile failed: the step runs uncompiled",
                None: "step not called yet"}[self.source]

    def _first_call(self, *args, **kwargs):
        reuse_vec_isa_probe()
        if self.saved_as is not None:
            found = precompiled(self.fn, self.saved_as, args, kwargs)
            if found is not None:
                compiled, source = found
                guarded = GuardedOnChange(compiled, self.fn.__self__, self.fingerprint, self.call)
                try:
                    result = guarded(*args, **kwargs)
                except Exception as e:  # a file that loads but cannot run: forgotten, and the step traced anew
                    precompiled_path(self.fn, self.saved_as, args, kwargs).unlink(missing_ok=True)
                    warnings.warn(f"the {source} compiled step failed ({error_summary(e)}); it is "
                                  "deleted and the step compiled the usual way", stacklevel=2)
                else:
                    self.call, self.source = guarded, source
                    return result
        try:
            result = self.call(*args, **kwargs)
            self.source = "compiled"
            return result
        except Exception as e:
            warnings.warn(f"torch.compile failed ({error_summary(e)}); training continues "
                          "without it (set compile = \"off\" to skip the attempt)", stacklevel=2)
            self.call, self.source = self.fn, "eager"
            return self.fn(*args, **kwargs)


class GuardedOnChange:
    """A loaded or ahead-of-time compiled bound method (`precompiled`) that checks its guards before a call
    whose `fingerprint(*args, **kwargs)` differs from the last checked call's (before every call without a
    fingerprint), and runs the compiled code directly otherwise. Where the guards fail (the call is not the
    one compiled), `fallback` runs it: torch.compile's usual path, which traces for it."""

    def __init__(self, compiled, owner, fingerprint, fallback):
        self.compiled, self.owner, self.fingerprint, self.fallback = compiled, owner, fingerprint, fallback
        self.checked = None

    def __call__(self, *args, **kwargs):
        key = None if self.fingerprint is None else self.fingerprint(*args, **kwargs)
        if key is None or key != self.checked:
            if not self.compiled.guard_check(self.owner, *args, **kwargs):
                return self.fallback(*args, **kwargs)
            self.checked = key
        return self.compiled.fn(self.owner, *args, **kwargs)


def precompiled(method, saved_as: str, args: tuple, kwargs: dict):
    """A bound method compiled whole ahead of its call (torch.compile's `aot_compile`, experimental in torch
    2.13), and kept in the compile cache's folder: `(compiled, "loaded")` from an earlier process's file,
    `(compiled, "saved")` compiled now (and written, where the function can be), or None where any of it
    fails (then torch.compile's usual path runs). `compiled` takes the method's object as its first
    argument; `GuardedOnChange` calls it.

    Loading skips what a warm compile cache still costs each process: dynamo tracing the Python again
    (docs/performance.md#compiling). The file's name is a hash of all
    the compiled code may depend on: torch, Python, the CPU's vector ISA, vitscope's source, the names of its
    custom ops, `saved_as`, the arguments' structure (tensors' shapes, dtypes and devices; other values as
    they are), the autocast state and inductor's settings. The function's own guards are checked too
    (`GuardedOnChange`)."""
    try:
        from torch._guards import TracingContext, tracing

        owner = method.__self__
        path = precompiled_path(method, saved_as, args, kwargs)
        external = {"self": owner}  # the object is the caller's, not part of the file
        if path.is_file():
            try:
                # Unpickling the guards installs import guards that want a tracing context (torch 2.13).
                with tracing(TracingContext(None)), path.open("rb") as file:
                    loaded = torch.compiler.load_compiled_function(file, external_data=external)
                if loaded.guard_check(owner, *args, **kwargs):
                    os.utime(path)  # used now: the last to be pruned
                    return loaded, "loaded"
            except Exception:
                pass  # compiled anew below, and the file replaced
        compiled = torch.compile(private_code(method), fullgraph=True, dynamic=False).aot_compile((args, kwargs))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            compiled.save_compiled_function(str(path), external_data=external)  # written whole, then renamed
            prune_saved(path.parent)
        except Exception:
            pass  # still compiled, for this process
        return compiled, "saved"
    except Exception:
        return None


def precompiled_path(method, saved_as: str, args: tuple, kwargs: dict) -> Path:
    from torch._inductor import config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    # The saved graph calls vitscope's custom ops by name, and their names carry the digest this process gave
    # them (cpu_kernels.VERSION, which also covers the kernels' headers): a graph saved under other names
    # would fail at its first call.
    autocast_state = [(device, torch.is_autocast_enabled(device), str(torch.get_autocast_dtype(device)))
                      for device in ("cpu", "cuda")]
    key = json.dumps([torch.__version__, sys.version, platform.machine(), torch.backends.cpu.get_cpu_capability(),
                      _source_digest(), kernel_ops_version, method.__qualname__, saved_as, _structure(args),
                      _structure(kwargs), autocast_state, repr(sorted(config.save_config_portable().items()))])
    return Path(cache_dir()) / "vitscope-precompiled" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.bin"


KEEP_SAVED = 32  # saved steps kept in the compile cache's folder (1.7-3.5 MB each at the presets' sizes)


def prune_saved(folder: Path, keep: int = KEEP_SAVED) -> None:
    """Delete all but the `keep` most recently saved or loaded steps in `folder`: each vitscope version,
    config and batch shape saves its own, and nothing else would ever remove the old ones."""
    def last_used(file: Path) -> float:
        try:
            return file.stat().st_mtime
        except OSError:  # another process pruned it first
            return 0.0

    for file in sorted(folder.glob("*.bin"), key=last_used, reverse=True)[keep:]:
        file.unlink(missing_ok=True)


def _structure(value):
    """What a compiled graph sees of its arguments: tensors' metadata, containers' shapes, other values."""
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), list(value.stride()), str(value.dtype), str(value.device),
                value.requires_grad]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_structure(item) for item in value]]
    if isinstance(value, dict):
        return ["dict", [[repr(k), _structure(v)] for k, v in value.items()]]
    return repr(value)


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A hash of vitscope's own Python files: a changed model or step must never load an old graph. (The
    kernels' sources are in cpu_kernels.VERSION, which `precompiled_path` adds to the key.)"""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for file in sorted(package.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def private_code(fn):
    """`fn` (a function, closure or bound method) with a code object of its own: the same code, defaults,
    closure and `self`. Anything else comes back as it is."""
    func = getattr(fn, "__func__", fn)
    if not isinstance(func, types.FunctionType):
        return fn
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = func.__kwdefaults__, func.__qualname__
    return types.MethodType(copy, fn.__self__) if isinstance(fn, types.MethodType) else copy


def reuse_vec_isa_probe() -> None:
    """Spare torch.compile its CPU vector-ISA probes in every process but the first.

    Inductor checks each vector ISA the CPU's flags claim (AVX2, AVX-512, ...) by building a test library
    and loading it in a new Python process, and some ISAs then check their extensions the same way, whatever
    `vec_isa_ok` says (AVX-512 BF16, VNNI, AMX and AMX-FP16 in torch 2.13): seconds of every compiled run
    (docs/performance.md#compiling). The first process runs the probes and records which ISAs passed and which
    of those checks passed, keyed by the torch build, the Python, the C++ compiler and the CPU's flags. Where
    every claimed ISA passed, this and every later process with the same key tell inductor so
    (`config.cpp.vec_isa_ok`); a check recorded as passed is not run again (`_recorded_checks`). Where an ISA
    failed, or anything here is not as expected (inductor internals move between torch versions), inductor
    probes as usual. A user's own TORCHINDUCTOR_VEC_ISA_OK always wins."""
    try:
        from torch._inductor import config, cpp_builder, cpu_vec_isa
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        if config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
            return
        flags = cpu_vec_isa.x86_isa_checker()
        claimed = claimed_vec_isas(flags)
        compiler = cpp_builder.get_cpp_compiler()
        compiler_path = shutil.which(compiler)
        key = json.dumps([torch.__version__, sys.executable, compiler_path,
                          os.stat(compiler_path).st_mtime_ns if compiler_path else None, sorted(flags), 2])
        record = Path(cache_dir()) / f"vitscope-vec-isa-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if record.is_file():
            found = json.loads(record.read_text())
            passed, checks = found["passed"], found["checks"]
            _recorded_checks(cpu_vec_isa, checks)
        else:
            checks = _recorded_checks(cpu_vec_isa, {})
            passed = sorted(str(isa) for isa in cpu_vec_isa.valid_vec_isa_list())  # runs the probes
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(record, json.dumps({"passed": passed, "checks": checks}))
        # Set in the probing process too: the setting is part of inductor's compile-cache key, so every
        # process of a machine must agree on it, or the second run would compile everything again.
        if claimed and passed == claimed:
            config.cpp.vec_isa_ok = True
    except Exception:  # the probe then runs as inductor's own code decides
        return


def _recorded_checks(cpu_vec_isa, checks: dict) -> dict:
    """Route inductor's `VecISA.check_build` (build a test library with an ISA's flags, load it in a new
    process) through `checks`: a check recorded there as passed is not run again, and one that passes is
    added to it. A failed check is not recorded, so it runs again in every process, as inductor would run it.
    Keyed by the ISA, its compiler flags and the test code. Installed once per process; returns the dict in
    use."""
    original = cpu_vec_isa.VecISA.check_build
    if getattr(original, "vitscope_checks", None) is not None:
        original.vitscope_checks.update(checks)
        return original.vitscope_checks

    @functools.wraps(original)
    def check_build(self, code: str) -> bool:
        key = f"{self}|{self.build_arch_flags()}|{hashlib.sha256(code.encode()).hexdigest()[:16]}"
        if check_build.vitscope_checks.get(key):
            return True
        passed = bool(original(self, code))
        if passed:
            check_build.vitscope_checks[key] = True
        return passed

    check_build.vitscope_checks = dict(checks)
    cpu_vec_isa.VecISA.check_build = check_build
    return check_build.vitscope_checks


def claimed_vec_isas(flags: list[str] | None = None) -> list[str]:
    """The names of inductor's x86 vector ISAs whose CPU flags this CPU has (all of them, for inductor's
    probe to check), sorted; `flags` as inductor reads them, read here if not given."""
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker() if flags is None else flags
    return sorted(str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                  if all(flag in flags for flag in str(isa).split()))
