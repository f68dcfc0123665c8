"""Build the compiled modules with ASan + UBSan into a cache dir and run pytest under them.

Used by ``make asan-test`` (``python3 -m tests.harness.asan [pytest args]``) and by
tests/test_fuzz_asan.py in ``make test``. The build goes to a directory keyed by the hash
of the compiled sources, so the normal in-place modules are never touched and a second
run does not rebuild. pyvhost is a namespace package: putting the build dir first on
sys.path (with ``python -P`` and ``--import-mode=append`` so nothing goes before it) makes
its modules win; tests.harness.asan_check refuses to run otherwise."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEEP_BUILDS = 3            # the sanitized builds of the most recently used sources
BUILDING_GRACE_S = 3600    # a build without its "done" mark younger than this is under way
REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
                  "UndefinedBehaviorSanitizer")


def source_hash() -> str:
    h = hashlib.sha256()
    files = sorted((ROOT / "pyvhost").glob("*.pyx")) + sorted((ROOT / "pyvhost").glob("*.pxd")) \
        + sorted((ROOT / "pyvhost").glob("*.h")) + [ROOT / "setup.py"]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(base: str | os.PathLike = "/tmp") -> Path:
    """The sanitized modules' lib dir (built if not already there for these sources)."""
    out = Path(base) / f"pyvhost-asan-{source_hash()}"
    lib = out / "lib"
    if (out / "done").exists():
        (out / "done").touch()             # used now: the newest to keep
        return lib
    env = dict(os.environ, PYVHOST_SANITIZE="1")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib),
         "--build-temp", str(out / "tmp"), "--force"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"sanitized build failed:\n{proc.stderr[-4000:]}")
    (out / "done").write_text("ok\n")
    prune(Path(base))
    return lib


def prune(base: Path, keep: int = KEEP_BUILDS) -> list[Path]:
    """Delete the sanitized builds of older sources (each ~60 MB; every edit of a .pyx made
    one more), keeping the ``keep`` most recently used and any build still under way; the
    ones deleted."""
    done, now = [], time.time()
    for d in base.glob("pyvhost-asan-*"):
        mark = d / "done"
        try:
            if mark.exists():
                done.append((mark.stat().st_mtime, d))
            elif now - d.stat().st_mtime > BUILDING_GRACE_S:
                done.append((0.0, d))      # a build that died half way
        except OSError:
            continue
    done.sort(reverse=True)
    gone = [d for _, d in done[keep:]]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def libasan() -> str:
    return subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True, check=True).stdout.strip()


def run_pytest(lib: Path, args: list[str], *, timeout: float = 1200,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": f"{lib}{os.pathsep}{ROOT}",
        "PYVHOST_ASAN_LIB": str(lib),
        "LD_PRELOAD": libasan(),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1:"
                        "allocator_may_return_null=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    })
    env.update(extra_env or {})
    cmd = [sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider",
           "--import-mode=append", "-p", "tests.harness.asan_check", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def reports(proc: subprocess.CompletedProcess) -> list[str]:
    text = proc.stdout + proc.stderr
    return [line for line in text.splitlines() if any(m in line for m in REPORT_MARKERS)]


def main(argv: list[str]) -> int:
    lib = build()
    print(f"asan: sanitized modules in {lib}", flush=True)
    proc = run_pytest(lib, argv or ["-q", "tests"])
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    found = reports(proc)
    if found:
        print(f"asan: {len(found)} sanitizer report lines", file=sys.stderr)
        return 1
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
