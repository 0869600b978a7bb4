"""Automation using nox: thin sessions over importable logic."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.needs_version = ">=2025.02.09"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["experiment"]

ROOT = Path(__file__).parent.resolve()
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
QUICKSTART = "experiments/quickstart.yaml"


def _install(session: nox.Session, *groups: str) -> None:
    requirements = [r for g in groups for r in nox.project.dependency_groups(PYPROJECT, g)]
    session.install("-e", ".", *requirements)


@nox.session
def experiment(session: nox.Session) -> None:
    """Run an experiment (default: the quickstart on backend auto); prints the results folder."""
    _install(session)
    args = session.posargs or [QUICKSTART]
    if not any(a.endswith((".yaml", ".yml")) for a in args):
        args = [QUICKSTART, *args]
    session.run("kpbench", "run", *args)


@nox.session
def report(session: nox.Session) -> None:
    """Render a report: nox -s report -- RESULTS_DIR... [--out DIR]."""
    if not session.posargs:
        session.error("Usage: nox -s report -- RESULTS_DIR... [--out DIR]")
    _install(session)
    session.run("kpbench", "report", *session.posargs)


@nox.session
def figures(session: nox.Session) -> None:
    """Regenerate the published figures, the claims report and the README's claims table."""
    _install(session)
    session.run("kpbench", "figures")
    session.run("kpbench", "findings")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the default test suite (slow tests and lab cells in the kernel VM excluded)."""
    _install(session, "test")
    session.run("pytest", "-m", "not slow and not vm", *session.posargs)


@nox.session(name="tests-slow", default=False)
def tests_slow(session: nox.Session) -> None:
    """Run the slow tests only."""
    _install(session, "test")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and type-check with ruff and mypy."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Print speed and memory figures of the simulator (no assertions)."""
    _install(session)
    session.run("python", "-m", "kpbench.bench", *session.posargs)


SCALE = "experiments/lab/scale.yaml"


@nox.session(default=False)
def scale(session: nox.Session) -> None:
    """Rule sync time and connect latency per kube-proxy mode as Services grow (root; the host's
    kernel and the kernel VM's); prints the results folder last."""
    _install(session)
    args = session.posargs
    if not any(a.endswith((".yaml", ".yml")) for a in args):
        args = [SCALE, *args]
    session.run("kpbench", "scale", *args)


@nox.session(name="tests-vm", default=False)
def tests_vm(session: nox.Session) -> None:
    """Run the lab tests whose nodes run in the kernel VM (IPVS where the host has none)."""
    _install(session, "test")
    session.run("pytest", "-m", "vm", "-rs", *session.posargs)


@nox.session(name="kernel-conformance", default=False)
def kernel_conformance(session: nox.Session) -> None:
    """The IPVS model against a stock kernel's IPVS in QEMU; exits 0 only if they agree."""
    _install(session)
    session.run("python", "-m", "kpbench.conformance.run", *session.posargs)


@nox.session(name="e2e-kind", default=False)
def e2e_kind(session: nox.Session) -> None:
    """End-to-end test on real kind clusters; skips, with the reason, without Docker or kind."""
    _install(session, "test")
    session.run("pytest", "-m", "kind", "-rs", "tests", *session.posargs)


@nox.session(venv_backend="none")
def clean(session: nox.Session) -> None:
    """Remove kind clusters / lab namespaces this suite created, and nox's virtualenvs."""
    if shutil.which("kpbench"):
        session.run("kpbench", "clean", external=True)
    session.log("# To remove the virtualenvs as well: rm -rf .nox")


if __name__ == "__main__":
    nox.main()
