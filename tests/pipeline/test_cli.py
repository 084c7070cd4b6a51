"""The usp CLI: --help on every command, one-line errors with exit code != 0 for user mistakes."""

import subprocess
import sys
from pathlib import Path

import pytest

from usp_core.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ["demo", "ingest", "backtest", "tune", "promote", "config", "audit", "predict", "bench"]


@pytest.mark.parametrize("argv", [[c, "--help"] for c in COMMANDS] + [["config", "rollback", "--help"],
                                                                       ["audit", "verify", "--help"],
                                                                       ["audit", "reanchor", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage: usp" in capsys.readouterr().out


def test_usp_help_does_not_import_jax_or_dagster():
    code = ("import sys; from usp_core.cli import build_parser; build_parser();"
            "print(any(m.split('.')[0] in ('dagster', 'mlflow', 'optuna') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usp: error:") and "missing.csv" in err and "Traceback" not in err

    bad = tmp_path / "bad.toml"
    bad.write_text("[core\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    assert "malformed TOML" in capsys.readouterr().err

    assert main(["audit", "verify", "--log", str(tmp_path / "nope.jsonl"), "--config", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_arguments_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["tune", "--tier", "medium"])
    assert exc.value.code == 2


def test_audit_verify_on_a_chain(tmp_path, capsys):
    from usp_core.config.audit import append_audit_record

    log = tmp_path / "mutations.jsonl"
    append_audit_record(log, event="MUTATION_APPLIED", trigger="test", delta={"core.seed": (1, 2)})
    assert main(["audit", "verify", "--log", str(log)]) == 0
    assert "OK" in capsys.readouterr().out
    log.write_text(log.read_text().replace('"test"', '"evil"'))
    assert main(["audit", "verify", "--log", str(log)]) == 1
    log.unlink()
    assert main(["audit", "verify", "--log", str(log)]) == 1
    assert "truncated" in capsys.readouterr().out


def test_audit_reanchor_accepts_a_reviewed_legacy_log(tmp_path, capsys):
    from usp_core.config.audit import anchor_path, append_audit_record

    log = tmp_path / "mutations.jsonl"
    append_audit_record(log, event="MUTATION_APPLIED", trigger="test", delta={"core.seed": (1, 2)})
    anchor_path(log).unlink()  # a log written before anchors existed
    assert main(["audit", "verify", "--log", str(log)]) == 1
    assert main(["audit", "reanchor", "--log", str(log)]) == 0
    assert main(["audit", "verify", "--log", str(log)]) == 0


def test_ingest_then_commands_read_the_store(tmp_path, capsys, monkeypatch):
    """`usp ingest` appends to the store that `usp backtest|tune|promote` read; an empty store is a one-line
    error that says what to run."""
    import pandas as pd

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("USP_DUCKDB_PATH", raising=False)
    assert main(["backtest"]) == 2
    err = capsys.readouterr().err
    assert "holds no observations" in err and "usp ingest" in err and err.count("\n") == 1

    ts = pd.date_range("2024-01-01", periods=5, freq="D", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    f = tmp_path / "obs.csv"
    pd.DataFrame({"series_id": ["x"] * 5, "ts": ts, "value": ["1", "2", "abc", "4", "5"]}).to_csv(f, index=False)
    assert main(["ingest", str(f)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("4 observations appended, 0 already stored, 1 quarantined")
    assert str(tmp_path / "home" / "usp.duckdb") in out.out
    assert main(["ingest", str(f)]) == 0
    assert capsys.readouterr().out.startswith("0 observations appended, 4 already stored, 1 quarantined")
    assert main(["ingest"]) == 2
