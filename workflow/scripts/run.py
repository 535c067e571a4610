"""Run the workflow the way `make run` / `make smoke` do: resume whatever an interrupted run left, no flag to learn.

    python workflow/scripts/run.py [snakemake arguments]     e.g. --cores 8 --configfile conf/grid/smoke.yaml

1. Loads the project profile, workflow/profiles/default (`--workflow-profile`; not with `--profile`, which
   brings its own, e.g. workflow/profiles/slurm): Snakemake itself looks for profiles/default beside the
   Snakefile, and this project keeps its top level to the Snakefile, code, configs and results. The profile
   turns on rerun-incomplete (a job cut short is recomputed, not an IncompleteFilesException), keep-going and
   latency-wait.
2. Removes a lock left by a Snakemake that was killed (SIGKILL, power or node loss) -- `snakemake --unlock`
   with the same arguments -- but only when no Snakemake process of this working directory is alive: a live
   one keeps its lock, and this run then stops with Snakemake's LockException, as it must.
3. Replaces itself with Snakemake (same process id: a signal sent to it reaches Snakemake).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROFILE = "workflow/profiles/default"


def workdir(args: list) -> Path:
    for i, a in enumerate(args):
        if a in ("-d", "--directory") and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--directory="):
            return Path(a.split("=", 1)[1])
    return Path.cwd()


def is_snakemake(argv: list) -> bool:
    """`snakemake ...`, `python -m snakemake ...`, `python .../bin/snakemake ...`."""
    head = [os.path.basename(a) for a in argv[:3]]
    return head[:1] == ["snakemake"] or "snakemake" in head[1:2] or argv[1:3] == ["-m", "snakemake"]


def live_snakemakes(wd: Path):
    """Process ids of the Snakemake processes running in `wd` (besides this one); None where /proc is missing."""
    proc = Path("/proc")
    if not (proc / "self" / "cmdline").exists():
        return None
    wd, me, found = wd.resolve(), os.getpid(), []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0") if a]
            cwd = Path(os.readlink(d / "cwd"))
        except OSError:  # gone, or another user's
            continue
        if argv and is_snakemake(argv) and cwd == wd:
            found.append(int(d.name))
    return found


def clear_stale_lock(args: list) -> None:
    wd = workdir(args)
    locks = wd / ".snakemake" / "locks"
    if not locks.is_dir() or not any(locks.iterdir()):
        return
    alive = live_snakemakes(wd)
    if alive is None:
        print(f"run: {locks} holds a lock and this system has no /proc to tell whether a Snakemake still runs; "
              "if none does, run this command with --unlock first", file=sys.stderr)
        return
    if alive:
        print(f"run: Snakemake is running in {wd} (pid {', '.join(map(str, alive))}): its lock is kept",
              file=sys.stderr)
        return
    print("run: removing the lock of an interrupted Snakemake run (no Snakemake runs here)", file=sys.stderr,
          flush=True)
    r = subprocess.run([sys.executable, "-m", "snakemake", "--unlock", *args], stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"run: `snakemake --unlock` failed (exit {r.returncode})")


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--unlock" not in args and "-n" not in args and "--dry-run" not in args:
        clear_stale_lock(args)
    profile = [] if any(a.split("=")[0] in ("--profile", "--workflow-profile") for a in args) \
        else ["--workflow-profile", PROFILE]
    cmd = [sys.executable, "-m", "snakemake", *profile, *args]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
