"""Speed on a busy CPU: `gem3d demo` and a small `gem3d enhance` with each thread setting, on the
machine as it is and beside a fixed background load (two torch processes doing matmuls with
torch's default threads, started and stopped by this script, bounded in time).

Settings, each a fresh `gem3d` process (as a user runs it):
  old default   torch's own pools and OpenMP's default (spinning) wait policy, as gem3d ran before
                issue 25: OMP_NUM_THREADS = torch's default count, which gem3d leaves alone
  one thread    --threads 1
  new default   nothing set (gem3d.threads: free cores, sleeping pool threads)
Runs are interleaved (repeat -> condition -> task -> setting), so ratios come from one run under
the same conditions; a run longer than --cap seconds is stopped and shown as "> cap". The 1-minute
load average before and after each condition is recorded: other users of the machine count too.

  python benchmarks/under_load.py                  # writes benchmarks/results/under_load_cpu.{md,json}
  python benchmarks/under_load.py --smoke --out-dir /tmp/ul
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gem3d import threads

ROOT = Path(__file__).resolve().parent
POOL_VARIABLES = (*threads.POOLS, *threads.NO_SPINNING, threads.ENV)
LOAD = ("import time, torch\na = torch.randn(512, 512)\nend = time.time() + {seconds}\n"
        "while time.time() < end:\n    a @ a\n")
SETTINGS = ("old default", "one thread", "new default")


def clean_environment() -> dict:
    """This environment without any thread setting: what a user who set nothing has."""
    return {k: v for k, v in os.environ.items() if k not in POOL_VARIABLES}


def python_says(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_environment(),
                          check=True).stdout.strip()


def machine() -> dict:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": python_says("import torch; print(torch.__version__)"),
            "torch_default_threads": int(python_says("import torch; print(torch.get_num_threads())"))}


def setting_environment(setting: str, torch_threads: int) -> tuple:
    """(extra arguments before the command, environment) of a setting."""
    env = clean_environment()
    if setting == "old default":
        return [], dict(env, OMP_NUM_THREADS=str(torch_threads))
    if setting == "one thread":
        return ["--threads", "1"], env
    return [], env


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def background_load(processes: int, seconds: float, warm_s: float):
    """`processes` torch processes busy with matmuls at their default thread count, for at most
    `seconds`; stopped on leaving."""
    procs = [subprocess.Popen([sys.executable, "-c", LOAD.format(seconds=seconds)], env=clean_environment())
             for _ in range(processes)]
    try:
        time.sleep(warm_s)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run(args: list, env: dict, cap: float) -> dict:
    """Wall seconds of `gem3d ARGS`, or the cap when it ran longer (then stopped)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gem3d", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"wall_s": cap, "capped": True}
    if proc.returncode:
        raise RuntimeError(f"gem3d {' '.join(map(str, args))} failed: {err.strip()[-400:]}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "capped": False}


def tasks(work: Path, smoke: bool) -> dict:
    """{task: function(out folder) -> gem3d arguments}."""
    cases = 2 if smoke else 4
    data = work / "phantoms"
    subprocess.run([sys.executable, "-m", "gem3d", "phantom", "--out", str(data), "--cases", str(cases),
                    "--size", "64", "--slices", "24"], env=clean_environment(), check=True, capture_output=True)
    return {"demo": lambda out: ["demo", "--out", str(out), "--device", "cpu"],
            f"enhance {cases} cases": lambda out: ["enhance", "--dataset", str(data), "--out", str(out), "--times",
                                                   "1", "--device", "cpu"] + (["--steps", "2"] if smoke else [])}


def measure(args) -> dict:
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gem3d-under-load-") as folder:
        work = Path(folder)
        jobs = tasks(work, args.smoke)
        for repeat in range(args.repeats):
            for condition in ("as is", "loaded"):
                load = (background_load(args.load_processes, args.cap * 2 * len(jobs) * len(SETTINGS), args.warm)
                        if condition == "loaded" else contextlib.nullcontext())
                with load:
                    before = uptime()
                    for task, command in jobs.items():
                        for setting in SETTINGS:
                            extra, env = setting_environment(setting, info["torch_default_threads"])
                            threads = (info["torch_default_threads"] if setting == "old default" else 1
                                       if setting == "one thread" else int(subprocess.run(
                                           [sys.executable, "-c", "from gem3d import threads; "
                                            "print(threads.default_threads())"], env=env, capture_output=True,
                                           text=True, check=True).stdout))
                            out = work / f"out-{repeat}-{condition}-{task}-{setting}".replace(" ", "_")
                            result = run(extra + command(out), env, args.cap)
                            rows.append({"repeat": repeat, "condition": condition, "task": task,
                                         "setting": setting, "threads": threads, **result})
                            print(json.dumps(rows[-1]), flush=True)
                    rows_uptime = {"condition": condition, "repeat": repeat, "before": before, "after": uptime()}
                    info.setdefault("uptime", []).append(rows_uptime)
    return {"machine": info, "cap_s": args.cap, "load_processes": args.load_processes, "warm_s": args.warm,
            "rows": rows}


def summarise(result: dict) -> list:
    """Median wall time per (task, condition, setting) and the ratios the issue asks for."""
    rows = result["rows"]
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for condition in ("as is", "loaded"):
            median = {s: statistics.median(r["wall_s"] for r in rows if (r["task"], r["condition"], r["setting"])
                                           == (task, condition, s)) for s in SETTINGS}
            capped = {s: any(r["capped"] for r in rows if (r["task"], r["condition"], r["setting"])
                             == (task, condition, s)) for s in SETTINGS}
            best = min(median.values())
            lines.append({"task": task, "condition": condition, **{s: median[s] for s in SETTINGS},
                          "capped": [s for s in SETTINGS if capped[s]],
                          "old / new": round(median["old default"] / median["new default"], 2),
                          "new / one": round(median["new default"] / median["one thread"], 2),
                          "new / best": round(median["new default"] / best, 2)})
    for task in dict.fromkeys(r["task"] for r in rows):
        pair = {line["condition"]: line for line in lines if line["task"] == task}
        for setting in SETTINGS:
            pair["loaded"][f"{setting}: loaded / as is"] = round(pair["loaded"][setting] / pair["as is"][setting], 2)
    return lines


def markdown(result: dict, summary: list) -> str:
    info = result["machine"]
    cap = result["cap_s"]

    def seconds(line, setting):
        return f"> {cap:.0f}" if setting in line["capped"] else f"{line[setting]:.1f}"

    def ratio(line, key, top, bottom):
        """A ratio with a capped time in it is a bound: '>' when the numerator was capped."""
        bound = ">" if top in line["capped"] and bottom not in line["capped"] else "<" if bottom in line["capped"] \
            and top not in line["capped"] else "~" if line["capped"] and {top, bottom} <= set(line["capped"]) else ""
        return f"{bound}{line[key]:.2f}"

    out = [f"# Speed on a busy CPU: thread settings, {info['cpu']}, {info['cores']} cores, no GPU", "",
           f"Machine: {info['cpu']}, {info['cores']} cores | {info['platform']} | Python {info['python']} | "
           f"torch {info['torch']} (default {info['torch_default_threads']} threads)",
           f"Command: `{result['command']}`; load: "
           f"{result['load_processes']} torch processes with default threads doing 512x512 matmuls, "
           f"started {result['warm_s']:.0f} s before the condition's first run; runs capped at {cap:.0f} s.", "",
           "Wall seconds of a fresh `gem3d` process (median of the repeats); ratios within one run.", "",
           "| task | machine | old default | one thread | new default | old / new | new / one | new / best |",
           "|---|---|---|---|---|---|---|---|"]
    for line in summary:
        out.append(f"| {line['task']} | {line['condition']} | {seconds(line, 'old default')} | "
                   f"{seconds(line, 'one thread')} | {seconds(line, 'new default')} | "
                   f"{ratio(line, 'old / new', 'old default', 'new default')} | "
                   f"{ratio(line, 'new / one', 'new default', 'one thread')} | {line['new / best']:.2f} |")
    out += ["", "'>' / '<': a bound (a run stopped at the cap). Where the new default chose one thread, it and "
            "'one thread' ran the same configuration: their difference is the noise of the machine's other load."]
    out += ["", "Loaded / as-is time per setting (a capped time makes it a bound):", ""]
    for line in summary:
        if line["condition"] == "loaded":
            out.append(f"- {line['task']}: " + ", ".join(f"{s} {line[f'{s}: loaded / as is']:.1f}x" for s in SETTINGS))
    out += ["", "Threads the new default chose: " + ", ".join(
        f"{r['task']} {r['condition']}: {r['threads']}" for r in result["rows"] if r["setting"] == "new default"),
        "", "Machine load (`uptime`) before and after each condition:", ""]
    out += [f"- {u['condition']} (repeat {u['repeat']}): before `{u['before']}`; after `{u['after']}`"
            for u in info["uptime"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cap", type=float, default=240.0, help="Seconds after which a run is stopped.")
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--warm", type=float, default=20.0, help="Seconds the load runs before measuring.")
    parser.add_argument("--smoke", action="store_true", help="2 cases, 2 steps, short cap (CI).")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--render", type=Path, help="Only write the Markdown of a saved JSON result again.")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(result, result["summary"]))
        return result
    if args.smoke:
        args.cap, args.warm = min(args.cap, 120.0), min(args.warm, 1.0)
    result = measure(args)
    result["command"] = "python benchmarks/under_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = result["summary"] = summarise(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"under_load_{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result, summary)
    (args.out_dir / f"under_load_{args.tag}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
