"""Helpers shared by the subcommands: one-line errors, output locations checked before any compute,
machines and scale schedules looked up through the registry (the CLI compares no machine names)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["HelpFormatter", "fail", "note", "stage", "output_dir", "output_file", "claim_outputs", "release_claims",
           "add_overwrite", "machine_spec", "read_schedule", "fit_schedule", "load_network_run", "cli_message",
           "free_memory"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: …)`` once: not where the help text states its default already, and not
    for unset (``None``) or off (``False``) defaults, which say nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def fail(msg: str):
    """Stop with a one-line error (exit status 2-like message, no traceback)."""
    raise SystemExit(f"ellsjax: error: {msg}")


def note(msg: str) -> None:
    """One line on stderr that the user should read (a default taken, an input adapted)."""
    print(f"ellsjax: note: {msg}", file=sys.stderr, flush=True)


_T0 = [None]


def stage(msg: str) -> None:
    """One line per stage of a long command on stderr (with the seconds since the first stage), so
    a command without a progress bar still shows where it is."""
    import time

    now = time.perf_counter()
    if _T0[0] is None:
        _T0[0] = now
    print(f"ellsjax: [{now - _T0[0]:6.1f} s] {msg}", file=sys.stderr, flush=True)


# API argument names in library messages -> the flags that set them, per command (a CLI user never
# typed ``label=``); only a message's leading ``name:`` / ``name=`` is rewritten.
def cli_message(msg: str, flags: dict[str, str]) -> str:
    """``msg`` with a leading API argument name replaced by its flag (``label: …`` → ``--class: …``).

    Example:
        >>> cli_message("label: no training images of class 42", {"label": "--class"})
        '--class: no training images of class 42'
        >>> cli_message("limit=9 exceeds", {"limit": "--n-train"})
        '--n-train 9 exceeds'
    """
    for name, flag in flags.items():
        if msg.startswith(f"{name}: "):
            return f"{flag}: {msg[len(name) + 2:]}"
        if msg.startswith(f"{name}="):
            return f"{flag} {msg[len(name) + 1:]}"
    return msg


def add_overwrite(parser) -> None:
    """The ``--overwrite`` flag of commands whose outputs :func:`claim_outputs` protects."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in the output location (without it, an output "
                             "location that holds them is refused)")


_CLAIMS: list[Path] = []
_LOCK = ".ellsjax.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def claim_outputs(directory: Path, names: list[str], *, overwrite: bool, flag: str = "--out",
                  lock_name: str = _LOCK) -> None:
    """Claim an output location before any compute: refuse one that another live ``ellsjax`` process
    is writing (a lock file ``directory/lock_name`` holding its pid, created exclusively, so of two
    runs started at once only one proceeds), and one that holds results (``names``) of an earlier
    run unless ``overwrite``. The claim ends with the command (:func:`release_claims`); a lock left
    by a killed run is taken over."""
    lock = directory / lock_name
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            if pid is not None and pid != os.getpid() and _alive(pid):
                fail(f"{flag}: {directory} is being written by another ellsjax run (pid {pid}); wait for it to "
                     f"finish or choose another {flag}")
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                fail(f"{flag}: cannot write in {directory}: {e.strerror or e}")
            continue
        except OSError as e:
            fail(f"{flag}: cannot write in {directory}: {e.strerror or e}")
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {' '.join(sys.argv)}\n")
        _CLAIMS.append(lock)
        break
    else:
        fail(f"{flag}: cannot lock {directory}: another run keeps taking it")
    held = [n for n in names if (directory / n).exists()]
    if held and not overwrite:
        release_claims()
        what = (f"{directory / held[0]} already exists" if len(names) == 1 else
                f"{directory} already holds the results of an earlier run ({', '.join(held)})")
        fail(f"{flag}: {what}; pass --overwrite to replace them, or choose another {flag}")


def release_claims() -> None:
    """Remove the lock files this process took (:func:`claim_outputs`)."""
    while _CLAIMS:
        lock = _CLAIMS.pop()
        try:
            if lock.read_text().split()[0] == str(os.getpid()):
                lock.unlink()
        except (OSError, IndexError):
            pass


def free_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``; else physical memory), or
    ``None`` when the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _writable_dir(d: Path, flag: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".ellsjax-write-check-"):
            pass
    except OSError as e:
        fail(f"{flag}: cannot write in {d}: {e.strerror or e}")


def output_dir(path: Any, flag: str = "--out") -> Path:
    """Create the output directory (and its parents) and check that files can be written in it;
    called before any compute, so a bad location costs nothing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        fail(f"{flag}: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        fail(f"{flag}: cannot create the directory {out}: a part of the path is a file")
    except OSError as e:
        fail(f"{flag}: cannot create the directory {out}: {e.strerror or e}")
    _writable_dir(out, flag)
    return out


def output_file(path: Any, flag: str = "--out") -> Path:
    """Check an output file's location (its directory created, writable; the path not a directory)
    before any compute."""
    out = Path(path)
    if out.is_dir():
        fail(f"{flag}: {out} is a directory; give a file name")
    output_dir(out.parent if str(out.parent) else ".", flag)
    if out.exists() and not os.access(out, os.W_OK):
        fail(f"{flag}: {out} exists and is not writable")
    return out


def machine_spec(name: str, padding: str | None = None, flag: str = "--machine"):
    """The registry spec of ``--machine NAME`` (with ``--padding``, its padding variant)."""
    from ellsjax import machines

    try:
        spec = machines.spec(name)
    except ValueError:
        fail(f"{flag}: unknown machine {name!r}; known: {', '.join(machines.names())}")
    if padding is not None and padding != spec.padding:
        # the family's own name picks a member by padding (els --padding zeros is bbels); a member
        # named with a contradicting padding is an error
        twins = [s.name for s in machines.specs() if s.family is not None and s.family == spec.family
                 and s.padding == padding]
        if spec.name == spec.family and twins:
            return machines.spec(twins[0])
        if spec.padding is None:
            fail(f"--padding: --machine {name} has no padding option")
        hint = f"; use --machine {twins[0]}" if twins else ""
        fail(f"--padding: --machine {name} has {spec.padding} padding{hint}")
    return spec


def read_schedule(text: str, spec, *, nsteps: int, flag: str = "--scales"):
    """Read ``--scales TEXT`` for the machine of ``spec`` as a :class:`~ellsjax.scales.ScaleSchedule`
    whose kind fits the machine's scale (sizes, or widths ℓ)."""
    from ellsjax.scales import ScaleSchedule

    want = "width" if spec.scale_kind == "width" else "size"
    try:
        schedule = ScaleSchedule.load(text, nsteps=nsteps, kind=want)
    except ValueError as e:
        fail(f"{flag}: {e}")
    return fit_schedule(schedule, spec, text, flag=flag)


def fit_schedule(schedule, spec, text: str, flag: str = "--scales"):
    """Check that a schedule's kind and padding fit the machine of ``spec``; returns it."""
    if spec.scale_kind == "width" and schedule.kind != "width":
        fail(f"{flag}: {text} holds integer patch sizes; --machine {spec.name} takes window widths ℓ: a "
             "soft-window schedule (a JSON with 'ells', written by the differentiable calibration) or "
             "comma-separated widths ℓ")
    if spec.scale_kind in ("size", "side") and schedule.kind == "width":
        fail(f"{flag}: {text} is a soft-window schedule of widths ℓ; --machine {spec.name} takes integer patch "
             "sizes (use a soft-window machine with it)")
    if schedule.kind == "width" and schedule.padding is not None and spec.padding not in (None, schedule.padding):
        from ellsjax import machines

        try:
            other = f"; use --machine {machines.variant(spec.name, schedule.padding).name}"
        except ValueError:
            other = ""
        fail(f"{flag}: the schedule was learned for padding {schedule.padding!r}, not {spec.padding!r}{other}")
    return schedule


def load_network_run(model_dir: str, *, ema: bool = True):
    """``(network, images, labels)``: a trained run's ``Denoiser`` and its own training data.

    Errors name ``--model``."""
    from ellsjax import models, training

    try:
        network = models.load(model_dir, ema=ema)
        net_cfg, train_cfg = training.load_run_config(model_dir)
        images, labels = training.load_data(net_cfg, train_cfg)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        fail(cli_message(str(e), {"dir": "--model"}) if str(e).startswith("dir: ") else f"--model: {e}")
    return network, images, labels
