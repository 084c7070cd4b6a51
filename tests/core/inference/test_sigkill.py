"""SIGKILL at random points of `usp ingest` and of the inference job (SPEC §7, §10; issue 12).

Every run works on its own copy of a prepared DuckDB store and is killed with SIGKILL after a seeded random
delay (24 runs per command). Some kills (ingest: half, inference: one in six) fall anywhere in the command,
from its start to 1.05 times its duration as measured once on an unkilled run; the others fall inside the one
write transaction (from the moment the writer enters ``commit_observations`` / ``commit_inference`` to 1.3
times that call's measured duration), where a kill is most likely to tear something. Afterwards every store
must open and hold either all or nothing of the file (observations, quarantine rows and, for inference,
predictions, predictor states and the processed_files row together); a rerun then completes the file exactly
once (the same rows as an uninterrupted reference run, no duplicates), and a replay adds nothing.

Cost: a fresh interpreter pays ~2 s of imports and an inference child ~40 s of JAX compilation, so
- `usp ingest` runs in processes forked from one driver that imported the package once (no JAX work there);
- inference runs in one long-lived server child that compiles once (into a persistent compilation cache under
  ``tmp_path``). Its commit kills fork the writer at ``commit_inference`` (the forked child only does the
  DuckDB transaction, never JAX work) and SIGKILL it; its "anywhere" kills are fresh processes that run the
  whole job with the server's cache (read-only for them: a killed writer could leave a torn cache entry).
Nothing in the product is patched: markers and the fork come from thin wrappers around the store's methods.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.core.inference.conftest import SMALL, observations
from usp_core.inference import PredictionStore, file_sha256, ingest_file

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[3]
TIMEOUT_S = 300.0


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "USP_ROOT": str(tmp_path), "USP_DUCKDB_LOCK_TIMEOUT": "30"}
    for var in ("USP_DUCKDB_PATH", "DAGSTER_HOME", "JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE"):
        env.pop(var, None)
    return env


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _copies(base: Path, tmp_path: Path, kind: str, n: int) -> list[Path]:
    dbs = []
    for i in range(n):
        db = tmp_path / f"{kind}-{i}.duckdb"
        shutil.copyfile(base, db)
        dbs.append(db)
    return dbs


def _report(rows: list[dict]) -> None:
    for row in rows:
        print(json.dumps(row))


# Shared by the ingest driver and the inference server: fork a writer, kill it after a delay, tell what happened.
FORK_KILL = r"""
import os, select, signal, time

def read_marks(fd, until, timeout, seen):
    # read marker lines from fd into ``seen`` ({mark: monotonic time}) until ``until`` arrives or EOF
    buf = b""
    deadline = time.monotonic() + timeout
    while until not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0.0))
        if not ready:
            raise TimeoutError(f"no {until!r} marker within {timeout} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            seen.setdefault(line.decode(), time.monotonic())
    return seen[until]

def fork_and_kill(work, anchor, delay, timeout=300.0):
    # Run ``work(mark)`` in a forked child; ``mark(name)`` reports progress. SIGKILL the child ``delay`` s after
    # the ``anchor`` mark ("fork" = at once); delay None: no kill. Returns (outcome dict, marks seen).
    r, w = os.pipe()
    t_fork = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 3
        try:
            work(lambda name: os.write(w, name.encode() + b"\n"))
            os.write(w, b"done\n")
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    seen = {"fork": t_fork}
    try:
        if delay is not None:
            t0 = read_marks(r, anchor, timeout, seen)
            if t0 is not None:
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                os.kill(pid, signal.SIGKILL)
        read_marks(r, "done", timeout, seen)
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # never leave a hung writer behind
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(r)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if not killed and exit_code != 0:
        raise RuntimeError(f"writer failed without being killed: status {status}")
    return {"killed": killed, "finished": "done" in seen}, {k: v - t_fork for k, v in seen.items()}
"""


def _kill_plan(n: int, seed: int, whole: float, commit: float, every: int) -> list[tuple[str, float]]:
    """(anchor, delay) per run: every ``every``-th run anywhere in the command, the others inside the commit."""
    rng = random.Random(seed)
    return [("start", rng.uniform(0.0, 1.05 * whole)) if i % every == 0 else ("commit", rng.uniform(0.0, 1.3 * commit))
            for i in range(n)]


# ---------------------------------------------------------------- usp ingest

INGEST_RUNS = 24

INGEST_DRIVER = FORK_KILL + r"""
import json, random, sys
from usp_core.inference import PredictionStore, ingest_file
from usp_core.inference.store import PredictionStore as S

path, plan = sys.argv[1], json.loads(sys.argv[2])

def ingest(db):
    def work(mark):
        real = S.commit_observations
        def commit_observations(self, *args, **kwargs):  # the one write transaction of ``usp ingest``
            mark("commit")
            return real(self, *args, **kwargs)
        S.commit_observations = commit_observations
        ingest_file(path, PredictionStore(db), run_id="victim")
    return work

# one unkilled run measures the command, then one killed run per db: plan = {"measure": db, "runs": [db, ...]}
_, marks = fork_and_kill(ingest(plan["measure"]), None, None)
whole, commit = marks["done"], marks["done"] - marks["commit"]
print(json.dumps({"whole_s": whole, "commit_s": commit}), flush=True)
rng = random.Random(plan["seed"])
for i, db in enumerate(plan["runs"]):
    anchor, span = ("fork", 1.05 * whole) if i % 2 == 0 else ("commit", 1.3 * commit)
    delay = rng.uniform(0.0, span)
    outcome, _ = fork_and_kill(ingest(db), anchor, delay)
    print(json.dumps({"i": i, "anchor": anchor, "delay": round(delay, 4), **outcome}), flush=True)
"""


def _ingest_counts(db: Path, sha: str) -> dict[str, int]:
    store = PredictionStore(db)  # opens (and replays the WAL of) whatever the kill left
    with store.connect(read_only=True) as con:
        def one(sql):
            return int(con.execute(sql, [sha]).fetchone()[0])

        return {
            "file_obs": one("SELECT count(*) FROM observations WHERE source_sha256 = ?"),
            "other_obs": one("SELECT count(*) FROM observations WHERE source_sha256 IS DISTINCT FROM ?"),
            "file_quarantine": one("SELECT count(*) FROM quarantine WHERE source_sha256 = ?"),
            "other_quarantine": one("SELECT count(*) FROM quarantine WHERE source_sha256 IS DISTINCT FROM ?"),
        }


def test_sigkill_during_ingest_leaves_all_or_nothing_and_a_rerun_completes_once(tmp_path):
    # A stored history, then a large file that continues it, with bad rows of several kinds.
    full = observations({f"s{k}": 200 + 2000 for k in range(10)}, seed=1)
    history = full.groupby("series_id").head(200).reset_index(drop=True)
    new = full.groupby("series_id").tail(2000).reset_index(drop=True)
    new.loc[new.index[::499], "value"] = "abc"  # non_numeric
    new.loc[new.index[5::999], "value"] = "inf"  # non_finite
    new = pd.concat([new, new.iloc[100:130]], ignore_index=True)  # duplicates
    hist_file, new_file = tmp_path / "history.csv", tmp_path / "new.csv"
    history.to_csv(hist_file, index=False)
    new.to_csv(new_file, index=False)

    base = tmp_path / "base.duckdb"
    ingest_file(hist_file, PredictionStore(base))
    ref_db = tmp_path / "ref.duckdb"
    shutil.copyfile(base, ref_db)
    sha = ingest_file(new_file, PredictionStore(ref_db)).sha256
    empty, full_counts = _ingest_counts(base, sha), _ingest_counts(ref_db, sha)
    assert empty["file_obs"] == 0 and full_counts["file_obs"] > 19_000 and full_counts["file_quarantine"] >= 40
    assert full_counts["other_obs"] == empty["other_obs"] == 2000

    measure, *dbs = _copies(base, tmp_path, "ingest", INGEST_RUNS + 1)
    plan = {"measure": str(measure), "runs": list(map(str, dbs)), "seed": 2024}
    proc = subprocess.run([sys.executable, "-c", INGEST_DRIVER, str(new_file), json.dumps(plan)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(tmp_path), cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timing, *rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == INGEST_RUNS and timing["whole_s"] > 0

    for row, db in zip(rows, dbs, strict=True):
        counts = _ingest_counts(db, sha)
        assert counts in (empty, full_counts), (row, counts)  # one transaction: all or nothing, history kept
        row["committed"] = committed = counts == full_counts
        store = PredictionStore(db)
        r = ingest_file(new_file, store, run_id="rerun")
        assert r.appended == (0 if committed else full_counts["file_obs"]), row
        assert _ingest_counts(db, sha) == full_counts, row  # exactly once
        again = ingest_file(new_file, store, run_id="replay")
        assert again.appended == 0 and _ingest_counts(db, sha) == full_counts, row  # a replay adds nothing
    _report([timing, *rows])
    assert sum(r["killed"] for r in rows) >= INGEST_RUNS // 4  # the delays mostly fall before the end


# ---------------------------------------------------------------- inference job

INFER_FORKED_RUNS = 20  # killed inside the commit (forked writer)
INFER_SPAWNED_RUNS = 4  # killed anywhere in the job (fresh process)

# The long-lived server: one JSON command per stdin line, one JSON answer per stdout line.
SERVER = FORK_KILL + r"""
import json, sys, warnings
warnings.filterwarnings("ignore", message="os.fork")  # the forked child only runs the DuckDB transaction
cache, overrides = sys.argv[1:3]
import jax
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from usp_core import PredictorConfig
from usp_core.inference import PredictionStore, ingest_file, run_inference
from usp_core.inference.store import PredictionStore as S
cfg = PredictorConfig.default().replace(json.loads(overrides))
real_commit = S.commit_inference

class Killed(Exception):
    pass

def forked_commit(delay, report):
    # the job's commit runs in a forked child (DuckDB only, no JAX) that is killed after ``delay`` s
    def commit_inference(self, **kwargs):
        S.commit_inference = real_commit
        outcome, marks = fork_and_kill(lambda mark: real_commit(self, **kwargs), "fork", delay)
        report.update(outcome, commit_s=marks.get("done"))
        raise Killed  # the job died with its writer
    return commit_inference

for line in sys.stdin:
    cmd = json.loads(line)
    store = PredictionStore(cmd["db"])
    if cmd["op"] == "ingest":
        r = ingest_file(cmd["file"], store, run_id=cmd["run_id"])
        out = {"appended": r.appended, "quarantined": r.quarantined}
    elif cmd["op"] == "infer":
        r = run_inference(cmd["file"], cfg, store, run_id=cmd["run_id"])
        out = {"predictions_written": r.predictions_written, "states_written": r.states_written,
               "quarantined": r.quarantined, "new_series": r.new_series, "caught_up": r.caught_up}
    else:  # "kill_commit": delay None measures an unkilled forked commit
        out = {}
        S.commit_inference = forked_commit(cmd.get("delay"), out)
        try:
            run_inference(cmd["file"], cfg, store, run_id="victim")
        except Killed:
            pass
        finally:
            S.commit_inference = real_commit
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""

# A whole job in a fresh process. argv: db, file, jax cache dir, overrides (JSON).
VICTIM = r"""
import json, sys
db, path, cache, overrides = sys.argv[1:5]
import jax
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)  # read the cache, never write it

def say(mark):
    sys.stdout.write(mark + "\n")
    sys.stdout.flush()

from usp_core import PredictorConfig
from usp_core.inference import PredictionStore, run_inference
from usp_core.inference.store import PredictionStore as S
real = S.load_history
def load_history(self, *args, **kwargs):  # the job's first store access
    say("start")
    return real(self, *args, **kwargs)
S.load_history = load_history
run_inference(path, PredictorConfig.default().replace(json.loads(overrides)), PredictionStore(db), run_id="victim")
say("done")
"""


class _Lines:
    """stdout of a child, line by line, with timeouts (a reader thread feeds a queue)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.queue.put(line.strip())
        self.queue.put(None)

    def next(self, timeout: float = TIMEOUT_S) -> str | None:
        return self.queue.get(timeout=timeout)

    def wait_for(self, mark: str, timeout: float = TIMEOUT_S) -> float | None:
        """Monotonic time at which ``mark`` arrived; None if stdout ended first."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(deadline - time.monotonic(), 0.001))
            if line is None:
                return None
            if line == mark:
                return time.monotonic()


class _Server:
    def __init__(self, cache: Path, tmp_path: Path):
        self.err = tmp_path / "server.err"
        with self.err.open("w") as err:  # a file, not a pipe: warnings never fill a buffer nobody reads
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(cache), json.dumps(SMALL)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         cwd=REPO_ROOT, env=_env(tmp_path))
        self.lines = _Lines(self.proc)

    def __call__(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **{k: v if isinstance(v, float | None) else str(v)
                                                       for k, v in args.items()}}) + "\n")
        self.proc.stdin.flush()
        line = self.lines.next()
        assert line is not None, _tail(self.err)
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _spawn_victim(db: Path, path: Path, cache: Path, tmp_path: Path, delay: float | None) -> dict:
    """Run the whole job in a fresh process; SIGKILL it ``delay`` s after its first store access."""
    err = db.with_suffix(".err")
    with err.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", VICTIM, str(db), str(path), str(cache), json.dumps(SMALL)],
                                stdout=subprocess.PIPE, stderr=fh, text=True, cwd=REPO_ROOT, env=_env(tmp_path))
    lines = _Lines(proc)
    t_start = lines.wait_for("start")
    if t_start is not None and delay is not None:
        time.sleep(max(0.0, t_start + delay - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
    t_done = lines.wait_for("done")
    proc.wait(timeout=TIMEOUT_S)
    killed = proc.returncode == -signal.SIGKILL
    assert t_start is not None and (killed or proc.returncode == 0), _tail(err)
    return {"killed": killed, "finished": t_done is not None,
            "whole_s": None if t_done is None else t_done - t_start}


PRED_KEY = ["series_id", "ts", "horizon", "config_version"]
PRED_VALUES = ["prediction", "lower", "upper", "sigma", "mode", "regime_change", "degraded", "emergency",
               "rejected"]


def _inference_snapshot(db: Path, sha: str) -> dict:
    store = PredictionStore(db)  # opens (and replays the WAL of) whatever the kill left
    with store.connect(read_only=True) as con:
        def q(sql, *params):
            return con.execute(sql, list(params)).fetchall()

        preds = con.execute(f"SELECT {', '.join(PRED_KEY + PRED_VALUES)} FROM predictions "
                            f"ORDER BY {', '.join(PRED_KEY)}").df()
        return {
            "observations": q("SELECT count(*) FROM observations WHERE source_sha256 = ?", sha)[0][0],
            "all_observations": q("SELECT count(*) FROM observations")[0][0],
            "quarantine": q("SELECT count(*) FROM quarantine WHERE source_sha256 = ?", sha)[0][0],
            "processed": q("SELECT count(*) FROM processed_files WHERE source_sha256 = ?", sha)[0][0],
            "predictions": len(preds),
            "distinct_predictions": len(preds.drop_duplicates(PRED_KEY)),
            "states": sorted(q("SELECT series_id, config_version, last_ts, n_steps FROM predictor_states")),
            "preds": preds,
        }


def _same(a: dict, b: dict) -> bool:
    if any(a[k] != b[k] for k in a if k != "preds"):
        return False
    pa, pb = a["preds"], b["preds"]
    return (pa[PRED_KEY].equals(pb[PRED_KEY])
            and np.allclose(pa[PRED_VALUES].to_numpy(float), pb[PRED_VALUES].to_numpy(float), rtol=1e-12,
                            atol=0.0, equal_nan=True))


def _summary(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if k not in ("preds", "states")}


def test_sigkill_during_inference_leaves_all_or_nothing_and_a_rerun_completes_once(tmp_path):
    m = 64
    full = observations({"a": m + 10, "b": m + 5, "c": m + 4}, seed=5)
    by = {sid: g.reset_index(drop=True) for sid, g in full.groupby("series_id")}
    # states for a, b, c (initialised only: nothing stepped, so the server compiles init_batch and one
    # step_batch, the one for states decoded from the store that the victims run)
    first = pd.concat([g.iloc[:m] for g in by.values()], ignore_index=True)
    ingested = by["a"].iloc[m: m + 4]  # stored but not yet consumed by a's state: caught up
    second = pd.concat([by["a"].iloc[m + 4:], by["b"].iloc[m:], by["c"].iloc[m:]], ignore_index=True)
    second.loc[2, "value"] = "abc"  # quarantined, the other rows still go through
    second = pd.concat([second, observations({"short": 5}, seed=6)],  # too little history: quarantined
                       ignore_index=True)
    files = {name: tmp_path / f"{name}.csv" for name in ("first", "ingested", "second")}
    for name, df in (("first", first), ("ingested", ingested), ("second", second)):
        df.to_csv(files[name], index=False)
    sha = file_sha256(files["second"])
    expected_predictions = 4 + 6 + 5 + 4 - 1  # a: 4 caught up + 6 rows; b: 5; c: 4; one bad row

    cache = tmp_path / "jax_cache"
    phases = {"t0": time.monotonic()}
    server = _Server(cache, tmp_path)
    try:
        base = tmp_path / "base.duckdb"
        assert server("infer", db=base, file=files["first"], run_id="first")["predictions_written"] == 3
        assert server("ingest", db=base, file=files["ingested"], run_id="ingest")["appended"] == 4
        ref_db = tmp_path / "ref.duckdb"
        shutil.copyfile(base, ref_db)
        ref = server("infer", db=ref_db, file=files["second"], run_id="ref")  # compiles what the victims run
        assert (ref["caught_up"], ref["new_series"], ref["predictions_written"]) == (4, 0, expected_predictions)
        before, after = _inference_snapshot(base, sha), _inference_snapshot(ref_db, sha)
        assert (before["observations"], before["processed"], before["quarantine"]) == (0, 0, 0)
        assert (after["processed"], after["quarantine"]) == (1, 6)
        assert after["predictions"] == after["distinct_predictions"] == before["predictions"] + expected_predictions
        assert len(before["states"]) == len(after["states"]) == 3 and before["states"] != after["states"]

        phases["prepared"] = time.monotonic()
        measure_commit, measure_whole, *dbs = _copies(base, tmp_path, "infer",
                                                      INFER_FORKED_RUNS + INFER_SPAWNED_RUNS + 2)
        commit_s = server("kill_commit", db=measure_commit, file=files["second"], delay=None)["commit_s"]
        whole_s = _spawn_victim(measure_whole, files["second"], cache, tmp_path, None)["whole_s"]
        every = (INFER_FORKED_RUNS + INFER_SPAWNED_RUNS) // INFER_SPAWNED_RUNS
        rows = []
        for i, ((anchor, delay), db) in enumerate(zip(_kill_plan(len(dbs), 7, whole_s, commit_s, every), dbs,
                                                      strict=True)):
            if anchor == "start":
                outcome = _spawn_victim(db, files["second"], cache, tmp_path, delay)
            else:
                outcome = server("kill_commit", db=db, file=files["second"], delay=delay)
            rows.append({"i": i, "anchor": anchor, "delay": round(delay, 4), "killed": outcome["killed"],
                         "finished": outcome["finished"]})

        phases["killed"] = time.monotonic()
        replayed = False
        for row, db in zip(rows, dbs, strict=True):
            snap = _inference_snapshot(db, sha)
            assert snap["predictions"] == snap["distinct_predictions"], row
            # all or nothing: observations, predictions, states, quarantine and processed_files together
            assert _same(snap, before) or _same(snap, after), (row, _summary(snap), _summary(after))
            row["committed"] = committed = _same(snap, after)
            r = server("infer", db=db, file=files["second"], run_id="rerun")
            assert r["predictions_written"] == (0 if committed else expected_predictions), row
            assert _same(_inference_snapshot(db, sha), after), row  # exactly once: the reference's rows
            if not committed and not replayed:  # (a rerun of a committed file is itself a replay)
                again = server("infer", db=db, file=files["second"], run_id="replay")
                assert again["predictions_written"] == 0 and _same(_inference_snapshot(db, sha), after), row
                replayed = True
        phases["rerun"] = time.monotonic()
    finally:
        server.close()
    spent = {f"{k}_s": round(phases[k] - phases[j], 1) for j, k in zip(phases, list(phases)[1:], strict=False)}
    _report([{"whole_s": whole_s, "commit_s": commit_s, **spent}, *rows])
    assert sum(r["killed"] for r in rows) >= len(rows) // 4
