"""Sessions: tests, tests_slow, typecheck, lint, demo, demo_cuda (torchrun on GPUs), bench, memory, models."""

from __future__ import annotations

import nox

nox.options.sessions = ["typecheck", "lint", "tests"]
INSTALL = ("-c", "constraints.txt", "-e")


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*INSTALL, ".[dev,hf]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def tests_slow(session: nox.Session) -> None:
    """The tests marked ``slow`` (fake worlds of 1024/4096 ranks), which ``tests`` leaves out."""
    session.install(*INSTALL, ".[dev,hf]")
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(*INSTALL, ".[dev]")
    session.run("mypy")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "moefn", "tests", "benchmarks")


@nox.session
def demo(session: nox.Session) -> None:
    session.install(*INSTALL, ".")
    session.run("moefn", "demo", *session.posargs)


@nox.session
def demo_cuda(session: nox.Session) -> None:
    """The same demo on one node's GPUs with NCCL: ``nox -s demo_cuda -- 8``."""
    nproc = session.posargs[0] if session.posargs else "8"
    session.install("torch", "-e", ".")
    session.run("torchrun", f"--nproc-per-node={nproc}", "-m", "moefn", "demo")


@nox.session
def bench(session: nox.Session) -> None:
    session.install(*INSTALL, ".[dev,hf]")
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session
def memory(session: nox.Session) -> None:
    """Predicted vs FSDPMemTracker-measured peak, every AC × CP × EP × dispatch on 4 gloo ranks;
    the table goes into docs/memory.md."""
    session.install(*INSTALL, ".[dev,hf]")
    session.run("python", "-m", "tests.memory_runs", "docs/memory.md")


@nox.session
def models(session: nox.Session) -> None:
    """Rewrite docs/models.md with numerics: every family that plans, on 4 gloo ranks vs one
    process (``nox -s models -- mixtral olmoe`` for some); minutes per family on 2 cores."""
    session.install(*INSTALL, ".[dev,hf]")
    session.run("python", "-m", "tests.models_numerics", *session.posargs)


@nox.session
def search_calibration(session: nox.Session) -> None:
    """The step-time model against 8 measured layouts on 4 gloo ranks: results/ and docs/."""
    session.install(*INSTALL, ".[dev,hf]")
    session.run("python", "-m", "benchmarks.search_calibration", *session.posargs)
