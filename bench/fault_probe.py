"""Probe how slimpipe ends under bad input and faults: the before/after table of docs/reliability.md.

Every case runs ``python -m slimpipe ...`` in a subprocess against the source tree given by ``--src`` (a
checkout's ``src``; default: the installed package) and records the exit code, the lines on stderr,
whether a traceback appeared, the wall time, and for the fault runs how long the ranks took to end and
whether any outlived the run. A case *ends clean* when the exit code is the expected one (2 for bad input,
non-zero for faults), stderr holds exactly one ``slimpipe`` line and no traceback, no existing file was
replaced, nothing was published and no process was left behind. Reproduce (the "before" tree is the
commit issue #16 was filed against)::

    git archive fd6d78f src | tar -x -C /tmp/before
    flock /work/measure.lock python bench/fault_probe.py --src /tmp/before/src --json before.json
    flock /work/measure.lock python bench/fault_probe.py --json after.json --markdown after.md

Needs ``unshare -rm`` for the disk-full case (skipped otherwise). Takes 3–6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TINY = "--model tiny --data synthetic --seq-len 64 --global-batch 4 --threads 1 --no-progress --peak-tflops 1"
SIM = "simulate --seq-len 65536 --global-batch 8 --pp 4 --slices 4"
PLOT = "plot --model tiny --seq-len 64 --global-batch 4 --pp 2 --cost uniform"
PLAN = "plan --seq-len 64K --gpus 16"

# group | expected exit ("-": any non-zero) | case | argv ({d}: the case's scratch directory)
_TABLE = f"""
silent    | 2 | train --lr inf                      | train {TINY} --steps 3 --lr inf --out-dir {{d}}/run
traceback | 2 | train --clip -1                     | train {TINY} --clip -1 --out-dir {{d}}/run
traceback | 2 | train odd head_dim                  | train {TINY} --model {{d}}/odd.json --out-dir {{d}}/run
traceback | 2 | train --seq-len 1e12                | train {TINY} --seq-len 1000000000000 --slices 1 --out-dir {{d}}/run
traceback | 2 | plan --max-offload -0.5             | {PLAN} --max-offload -0.5
traceback | 2 | plan --max-offload nan              | {PLAN} --max-offload nan
nonsense  | 2 | plan --max-offload 2                | {PLAN} --max-offload 2
traceback | 2 | plot -o missing dir                 | {PLOT} -o {{d}}/missing/t.png
traceback | 2 | plot -o read-only dir               | {PLOT} -o /sys/t.png
traceback | 2 | plot -o unknown extension           | {PLOT} -o {{d}}/t.bmpx
traceback | 2 | plot --trace read-only              | {PLOT} --no-image --trace /sys/t.json
traceback | 2 | plot -o existing directory          | {PLOT} -o {{d}}
traceback | 2 | calibrate -o missing dir            | calibrate --quick -o {{d}}/missing/p.json
traceback | 2 | calibrate -o read-only              | calibrate --quick -o /sys/p.json
traceback | 2 | calibrate -o directory              | calibrate --quick -o {{d}}
hang      | 2 | simulate --global-batch 10000000    | {SIM} --global-batch 10000000
hang      | 2 | simulate --slices 1048576           | {SIM} --slices 1048576 --seq-len 1048576
hang      | 2 | show --pp 1000 --microbatches 100000 | show --pp 1000 --microbatches 100000
nonsense  | 2 | simulate --tp 3 (64 heads)          | {SIM} --tp 3
nonsense  | 2 | simulate --tp 64                    | {SIM} --tp 64
nonsense  | 2 | simulate --cp 3                     | {SIM} --cp 3
nonsense  | 2 | simulate --cp 2 --seq-len 4097      | {SIM} --cp 2 --slices 1 --seq-len 4097
nonsense  | 2 | train --peak-tflops -1              | train {TINY} --peak-tflops -1 --out-dir {{d}}/run
nonsense  | 2 | train --weight-decay -1             | train {TINY} --weight-decay -1 --out-dir {{d}}/run
nonsense  | 2 | train --threads 1000                | train {TINY} --threads 1000 --steps 1 --out-dir {{d}}/run
nonsense  | 2 | train --attn-balance with 1f1b      | train {TINY} --schedule 1f1b --slices 1 --attn-balance 2 --steps 1 --out-dir {{d}}/run
nonsense  | 2 | simulate --profile negative times   | simulate --model tiny --seq-len 64 --global-batch 4 --pp 2 --profile {{d}}/neg.json
words     | 2 | train --data <directory>            | train {TINY} --data {{d}} --out-dir {{d}}/run
words     | 2 | train --config .                    | train --config {{d}} --out-dir {{d}}/run
words     | 2 | plot over an existing file          | {PLOT} -o {{d}}/old.png
words     | 2 | calibrate over an existing file     | calibrate --quick --threads 1 -o {{d}}/old.json
words     | 0 | calibrate progress into a pipe      | calibrate --quick --threads 1 -o {{d}}/new.json
"""  # noqa: E501 - one case per line reads better than wrapped ones
CLI_CASES = [(name.strip(), group.strip(), argv.split(), None if code.strip() == "-" else int(code))
             for group, code, name, argv in (row.split("|") for row in _TABLE.strip().splitlines())]
TINY = TINY.split()


def run(argv: list[str], src: str | None, timeout: float, cwd: str | None = None):
    """(exit code or None on timeout, stdout, stderr, seconds) of ``python -m slimpipe ARGV``."""
    env = _env(src)
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "slimpipe", *argv], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=cwd)
        return p.returncode, p.stdout, p.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return None, "", err, time.monotonic() - t0


def _env(src: str | None) -> dict:
    return dict(os.environ, **({"PYTHONPATH": src} if src else {}))


_WORDS = {"train --data <directory>": "is a directory", "train --config .": "is a directory",
          "resume: data contents changed": "changed since the save"}
"""Cases that already ended in one line, but with the wrong words: the line must say this."""


def verdict(code, err: str, expected: int | None, extra_ok: bool = True, case: str = "") -> dict:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "test hook" not in ln]
    one = len(lines) == 1 and lines[0].startswith("slimpipe") and _WORDS.get(case, "") in lines[0]
    tb = "Traceback" in err
    code_ok = code is not None and (code == expected if expected is not None else code != 0)
    ends = one if expected != 0 else not lines  # a success says nothing on stderr
    return {"exit": code, "lines": len(lines), "traceback": tb, "first": lines[-1][:160] if lines else "",
            "clean": bool(ends and not tb and code_ok and extra_ok)}


def setup(case_dir: Path, name: str) -> None:
    case_dir.mkdir(parents=True, exist_ok=True)
    if "head_dim" in name:
        odd = dict(num_layers=8, hidden=128, ffn=384, num_heads=4, num_kv_heads=2, head_dim=33,
                   vocab_size=256)
        (case_dir / "odd.json").write_text(json.dumps(odd))
    if "negative" in name:
        (case_dir / "neg.json").write_text(json.dumps(_profile(prefix_s=-1e-9)))
    (case_dir / "old.png").write_bytes(b"an earlier plot")
    (case_dir / "old.json").write_text("{}")


def _profile(**attn: float) -> dict:
    """A complete profile document as `slimpipe calibrate` writes it (every time 1e-5 s or 1e-11 s/item)."""
    line = {"fixed_s": 1e-5, "per_item_s": 1e-11}
    at = {"fixed_s": 1e-5, "prefix_s": 1e-11, "diagonal_s": 1e-11, "masked_diagonal_s": 1e-11, **attn}
    prof = dict(device="cpu", dtype="float32", dtype_bytes=4, threads=1, model="tiny", model_width=1,
                gemms=[{"in_features": 128, "out_features": 128, "fwd": line, "bwd": line}], compose_fwd=1.0,
                compose_bwd=1.0, action_fwd_s=0.0, action_bwd_s=0.0, p2p_latency_s=1e-5, p2p_bandwidth=1e9,
                attn_fwd=at, attn_bwd=at, footprint=None)
    for k in ("gemm", "elementwise", "embed", "loss"):
        prof[f"{k}_fwd"] = prof[f"{k}_bwd"] = line
    hw = dict(peak_flops=1e11, hbm_bytes=2**34, intra_node_bw=1e9, inter_node_bw=1e9)
    return {"format": "slimpipe-profile/1", "hardware": hw, "profile": prof}


def cli_cases(src: str | None, scratch: Path, timeout: float, pattern: str | None = None) -> list[dict]:
    out = []
    for name, group, argv, expected in CLI_CASES:
        if pattern and not re.search(pattern, name):
            continue
        d = scratch / re.sub(r"\W+", "_", name)
        setup(d, name)
        before = {p: p.read_bytes() for p in (d / "old.png", d / "old.json")}
        limit = max(timeout, 240.0) if argv[0] == "calibrate" else timeout  # a measurement takes 10–60 s
        code, _, err, wall = run([a.replace("{d}", str(d)) for a in argv], src, limit, cwd=str(d))
        untouched = all(p.read_bytes() == b for p, b in before.items())
        out.append({"case": name, "group": group, "wall_s": round(wall, 2),
                    **verdict(code, err, expected, untouched, name)})
        print(f"{name:40s} exit {code!s:>4} lines {out[-1]['lines']} tb {out[-1]['traceback']!s:5} "
              f"{wall:6.1f} s clean {out[-1]['clean']}", flush=True)
    return out


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(x) for t in tasks for x in (t / "children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fault_run(name: str, src: str | None, d: Path, fault, extra: list[str], wait_step: int = 2) -> dict:
    """Start a 2-rank run; after ``wait_step`` steps apply ``fault(launcher, ranks, d)``; time the end."""
    shutil.rmtree(d, ignore_errors=True)
    env = _env(src)
    argv = [sys.executable, "-m", "slimpipe", "train", *TINY, "--steps", "500", "--out-dir", str(d), *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    for line in proc.stdout:
        if re.match(rf"step +{wait_step}/", line):
            break
    ranks = _children(proc.pid)
    t0 = time.monotonic()
    fault(proc, ranks, d)
    ended = gone = None  # seconds until the launcher exited / every rank was gone
    while time.monotonic() - t0 < 150 and (ended is None or (gone is None and time.monotonic() - t0 < 60)):
        now = time.monotonic() - t0
        if gone is None and not any(_alive(r) for r in ranks):
            gone = now
        if ended is None and proc.poll() is not None:
            ended = now
        time.sleep(0.01)
    orphans = [r for r in ranks if _alive(r)]
    for r in orphans + [proc.pid]:
        try:
            os.kill(r, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.3)
    published = (d / "metrics.jsonl").exists() or (d / "config.json").exists()
    latest = d / "checkpoints" / "latest"
    named = latest.parent / latest.read_text().strip() if latest.exists() else None
    intact = named is None or (named / "trainer_state.json").is_file()
    code = proc.poll()
    res = verdict(code, "".join(err), None, not orphans and not published and intact)
    if name == "SIGKILL the launcher":  # it cannot print: clean means no rank survives it
        res["clean"] = not orphans and not published
    res.update(case=name, group="fault", wall_s=None if ended is None else round(ended, 2),
               ranks_gone_s=None if gone is None else round(gone, 2), orphans=len(orphans),
               published=published, checkpoint_intact=intact)
    print(f"{name:40s} exit {code!s:>4} lines {res['lines']} launcher ended {res['wall_s']} s, ranks gone "
          f"{res['ranks_gone_s']} s, orphans {len(orphans)} published {published} clean {res['clean']}",
          flush=True)
    return res


def _kill_mid_save(proc, ranks, d: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the next save's .tmp directory appears: kill rank 1 inside it
        if list((d / "checkpoints").glob("step_*.tmp")):
            os.kill(ranks[1], signal.SIGKILL)
            return
        time.sleep(0.002)


def fault_cases(src: str | None, scratch: Path) -> list[dict]:
    ck = ["--checkpoint-every", "1"]
    def term(p, r, d):
        p.send_signal(signal.SIGTERM)

    def intr(p, r, d):
        p.send_signal(signal.SIGINT)

    def kill1(p, r, d):
        os.kill(r[1], signal.SIGKILL)

    return [
        fault_run("SIGKILL rank 1", src, scratch / "kill1", kill1, []),
        fault_run("SIGTERM the launcher", src, scratch / "term", term, ck),
        fault_run("SIGINT the launcher", src, scratch / "int", intr, []),
        fault_run("SIGKILL the launcher", src, scratch / "killl", lambda p, r, d: p.kill(), []),
        fault_run("SIGSTOP rank 1 (--timeout 30)", src, scratch / "stop",
                  lambda p, r, d: os.kill(r[1], signal.SIGSTOP), ["--timeout", "30"]),
        fault_run("SIGKILL rank 1 mid-save", src, scratch / "save", _kill_mid_save, ck),
    ]


def train_cases(src: str | None, scratch: Path) -> list[dict]:
    """Divergence, a bit flip, damaged checkpoints, changed data, disk full (real runs of the tiny model)."""
    out = []
    base = scratch / "base"
    shutil.rmtree(base, ignore_errors=True)
    run(["train", *TINY, "--steps", "2", "--checkpoint-every", "1", "--out-dir", str(base)], src, 300)

    def case(name, group, argv, expected, check=lambda: True):
        code, _, err, wall = run(argv, src, 300)
        res = {"case": name, "group": group, "wall_s": round(wall, 2),
               **verdict(code, err, expected, check(), name)}
        print(f"{name:40s} exit {code!s:>4} lines {res['lines']} tb {res['traceback']!s:5} {wall:6.1f} s "
              f"clean {res['clean']}", flush=True)
        out.append(res)

    nan = scratch / "nan"
    shutil.rmtree(nan, ignore_errors=True)
    diverge = ["train", *TINY, "--lr", "1e30", "--lr-warmup", "1", "--steps", "4", "--checkpoint-every", "1"]
    case("train --lr 1e30 (diverges)", "silent", [*diverge, "--out-dir", str(nan)], None,
         lambda: _strict_logs(nan) and (nan / "checkpoints" / "step_000001").is_dir())
    damages = {
        "bit flip in a shard": lambda s: _flip(s / "__1_0.distcp"),
        "truncated shard": lambda s: os.truncate(s / "__1_0.distcp", 4096),
        "missing shard": lambda s: (s / "__0_0.distcp").unlink(),
        "garbage .metadata": lambda s: _garble(s / ".metadata"),
        "binary latest pointer": lambda s: (s.parent / "latest").write_bytes(os.urandom(32)),
    }
    for damage, apply in damages.items():
        d = scratch / re.sub(r"\W+", "_", damage)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base / "checkpoints", d / "ck")
        apply(d / "ck" / "step_000002")
        case(f"resume: {damage}", "silent" if "bit flip" in damage else "traceback",
             ["train", *TINY, "--steps", "4", "--out-dir", str(d / "run"), "--resume", str(d / "ck")], 2)
    d = scratch / "data_changed"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    corpus = d / "corpus.txt"
    corpus.write_bytes(bytes(range(256)) * 8)
    text = ["train", *TINY, "--data", str(corpus)]
    run([*text, "--steps", "1", "--checkpoint-every", "1", "--out-dir", str(d / "a")], src, 300)
    corpus.write_bytes(bytes(reversed(range(256))) * 8)  # same path and size, other contents
    case("resume: data contents changed", "words",
         [*text, "--steps", "3", "--out-dir", str(d / "b"), "--resume", str(d / "a" / "checkpoints")], 2)
    out.append(_disk_full(src, scratch / "disk"))
    return out


def _garble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


def _strict_logs(d: Path) -> bool:
    def refuse(name):
        raise ValueError(name)

    for log in (d / "metrics.jsonl", d / "metrics.jsonl.partial"):
        if log.exists():
            try:
                [json.loads(ln, parse_constant=refuse) for ln in log.read_text().splitlines() if ln.strip()]
            except ValueError:
                return False
    return True


def _disk_full(src: str | None, d: Path) -> dict:
    """A 30 MiB tmpfs in a private mount namespace: room for one tiny checkpoint (19 MiB), not two."""
    name = "disk full during a save"
    shutil.rmtree(d, ignore_errors=True)
    (d / "fs").mkdir(parents=True)
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode:
        return {"case": name, "group": "traceback", "skipped": True, "clean": False}
    script = ('mount -t tmpfs -o size=30m tmpfs "$1" || exit 90\n'
              f"{sys.executable} -m slimpipe train {' '.join(TINY)} --local-pipeline --steps 3 "
              '--checkpoint-every 1 --out-dir "$2" --checkpoint-dir "$1/ck"\ncode=$?\n'
              'cat "$1/ck/latest" > "$2.latest"; ls "$1/ck" > "$2.ls"; exit $code')
    t0 = time.monotonic()
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(d / "fs"), str(d / "run")],
                       capture_output=True, text=True, env=_env(src))
    kept = Path(f"{d / 'run'}.latest").read_text().strip() == "step_000001"
    kept = kept and Path(f"{d / 'run'}.ls").read_text().split() == ["latest", "step_000001"]
    res = {"case": name, "group": "traceback", "wall_s": round(time.monotonic() - t0, 2),
           **verdict(p.returncode, p.stderr, None, kept)}
    print(f"{name:40s} exit {p.returncode} lines {res['lines']} clean {res['clean']}", flush=True)
    return res


def markdown(rows: list[dict], title: str) -> str:
    head = ("| case | group | exit | stderr lines | traceback | time (s) | ranks gone (s) | clean |\n"
            "|---|---|---|---|---|---|---|---|\n")
    cells = ("case", "group", "exit", "lines", "traceback", "wall_s", "ranks_gone_s")
    row = "| " + " | ".join("{%s}" % c for c in cells) + " | {verdict} |\n"
    body = "".join(row.format(**{c: r.get(c, "") for c in cells}, verdict="yes" if r["clean"] else "no")
                   for r in rows)
    clean = sum(1 for r in rows if r["clean"])
    return f"### {title}\n\n{clean} of {len(rows)} cases end clean.\n\n{head}{body}"


def compare(before: list[dict], after: list[dict]) -> str:
    """One Markdown table of two runs, matched by case."""
    old = {r["case"]: r for r in before}

    def cell(r: dict | None) -> str:
        if r is None:
            return "not run"
        if r.get("exit") is None and r.get("wall_s") is not None:
            return f"still running at {r['wall_s']:.0f} s (killed)"
        if r.get("group") == "fault" and r.get("wall_s") is None:
            return f"launcher still running after 150 s (killed), {r.get('orphans')} orphan rank(s)"
        gone = r.get("ranks_gone_s", "")
        tail = f", ranks gone {gone} s" if gone not in ("", None) else ""
        tail += f", {r['orphans']} orphan(s)" if r.get("orphans") else ""
        tb = ", traceback" if r.get("traceback") else ""
        return f"exit {r.get('exit')}, {r.get('lines')} line(s){tb}, {r.get('wall_s')} s{tail}"

    rows = [f"| {r['case']} | {r['group']} | {cell(old.get(r['case']))} | {cell(r)} | "
            f"{'yes' if old.get(r['case'], {}).get('clean') else 'no'} → {'yes' if r['clean'] else 'no'} |"
            for r in after]
    n_old = sum(1 for r in after if old.get(r["case"], {}).get("clean"))
    n_new = sum(1 for r in after if r["clean"])
    return (f"{len(after)} cases; ending clean: {n_old} before, {n_new} after.\n\n"
            "| case | group | before | after | clean |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", help="source tree to probe (PYTHONPATH); default: the installed slimpipe")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a CLI case counts as a hang")
    ap.add_argument("--only", choices=("cli", "train", "faults"), help="run one group of cases")
    ap.add_argument("--cases", help="CLI cases whose name matches this regular expression only")
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--markdown", help="write the rows as a Markdown table")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE.json", "AFTER.json"),
                    help="print the Markdown before/after table of two --json runs and exit")
    args = ap.parse_args()
    if args.compare:
        sys.stdout.write(compare(*(json.loads(Path(p).read_text()) for p in args.compare)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="slimpipe-probe-"))
    print(f"load before: {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[dict] = []
    if args.only in (None, "cli"):
        rows += cli_cases(args.src, scratch, args.timeout, args.cases)
    if args.only in (None, "train"):
        rows += train_cases(args.src, scratch)
    if args.only in (None, "faults"):
        rows += fault_cases(args.src, scratch)
    print(f"load after: {os.getloadavg()[0]:.2f}; {sum(1 for r in rows if r['clean'])} of {len(rows)} clean")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, args.src or "installed"))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
