"""The ``usp`` command (SPEC §8). Imports are lazy so that ``usp --help`` answers at once.

User mistakes (bad config, missing file, bad value) end with one line ``usp: error: ...`` and exit code 2;
no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from usp_core.paths import config_path


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from usp_core.config import ConfigError
    from usp_core.inference import StoreBusyError

    errors: list[type[BaseException]] = [UserError, ConfigError, FileNotFoundError, ValueError, KeyError,
                                         PermissionError, IsADirectoryError, StoreBusyError]
    try:
        from usp_core.tuning.checkpoint import IntegrityError

        errors.append(IntegrityError)
    except ImportError:
        pass
    return tuple(errors)


def _load(args: argparse.Namespace):
    from usp_core.config import load_config

    return load_config(args.config)


def _panel(args: argparse.Namespace):
    """The observations a command works on: ``--data FILE`` (validated as ingestion would, nothing stored), else
    the observation store; ``--series`` keeps the first N series (by id), ``--length`` the newest N points."""
    from usp_core.inference import PredictionStore

    if args.data:
        from usp_core.data.schema import validate_observations
        from usp_core.inference import read_observation_file

        panel, quarantine = validate_observations(read_observation_file(args.data), 0)
        if len(quarantine):
            print(f"{args.data}: {len(quarantine)} rows quarantined "
                  f"({quarantine['reason'].value_counts().to_dict()})", file=sys.stderr)
        source = args.data
        if args.length:
            panel = panel.groupby("series_id", sort=False).tail(args.length)
    else:
        store = PredictionStore(args.db)
        panel = store.load_observations(max_length=args.length)
        source = f"the observation store {store.path}"
        if panel.empty:
            raise UserError(f"the observation store {store.path} holds no observations; "
                            "run `usp ingest FILE|DIR` (or `usp ingest --bundled` for the bundled series) first")
    ids = sorted(panel["series_id"].unique())
    if args.series:
        ids = ids[: args.series]
        panel = panel[panel["series_id"].isin(ids)]
    print(f"{len(ids)} series, {len(panel)} observations from {source}", file=sys.stderr)
    return panel.reset_index(drop=True)


def cmd_demo(args: argparse.Namespace) -> int:
    # usp_core never imports dagster: the demo is the pipeline package's entry point, run as a module
    command = [sys.executable, "-m", "usp_pipeline.demo"]
    if args.series:
        command += ["--series", str(args.series)]
    if args.length:
        command += ["--length", str(args.length)]
    if args.trials:
        command += ["--trials", str(args.trials)]
    return subprocess.call(command)


def cmd_backtest(args: argparse.Namespace) -> int:
    from usp_core.backtest.runner import run_backtest

    cfg = _load(args)
    panel = _panel(args)
    print(f"backtesting config {cfg.version} ...", file=sys.stderr)
    result = run_backtest(cfg, panel, include=args.include)
    print(f"config {cfg.version}  objective ({result.objective_name}) = {result.objective:.6g}")
    print(result.aggregate.to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from usp_core.tuning.campaign import run_campaign

    cfg = _load(args)
    result = run_campaign(cfg, _panel(args), tier=args.tier, n_trials=args.trials,
                          storage=args.storage, workers=args.workers, campaign=args.campaign, progress=True)
    print(result.report.text)
    print(f"study {result.study_name} on {result.storage.split('@')[-1]}: best {result.best_value}")
    if result.mlflow_run_url:
        print(f"MLflow run: {result.mlflow_run_url}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import optuna

    from usp_core.config import load_config
    from usp_core.promotion.gate import evaluate_promotion
    from usp_core.promotion.promote import challenger_changes, promote
    from usp_core.promotion.registry import ConfigRegistry
    from usp_core.tuning.optimizer import default_storage_url, make_storage, study_name_for

    judged_version = load_config(args.config, environ={}).version  # the file's own version: the CAS compares it
    champion = _load(args)
    storage = args.storage or default_storage_url()
    name = study_name_for(args.campaign or f"{args.tier}-tuning", args.tier)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(storage))
        best = study.best_trial.user_attrs.get("config_params", study.best_params)  # after the cross-field repair
    except (KeyError, ValueError) as exc:
        raise UserError(f"no finished trials in study {name!r} on {storage}; run `usp tune --tier {args.tier}` first") from exc
    challenger = champion.replace(best, source=f"study {name}")
    panel = _panel(args)
    decision = dataclasses.replace(evaluate_promotion(champion, challenger, panel), champion_version=judged_version)
    print(f"gate: {decision.reason}")
    outcome = promote(args.config, challenger_changes(champion, challenger), decision,
                      registry=ConfigRegistry.for_config(args.config))
    print(f"{'promoted' if outcome.promoted else 'not promoted'}: {outcome.reason}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from usp_core.config import mutation

    if args.config_command == "show":
        print(mutation.show_config(args.config, section=args.section))
    elif args.config_command == "diff":
        other = args.other or _previous_backup(args.config)
        print(mutation.format_diff(mutation.diff_configs(other, args.config)) or "no differences")
    elif args.config_command == "rollback":
        from usp_core.promotion.registry import ConfigRegistry

        result = mutation.rollback(args.config, to_version=args.to, registry=ConfigRegistry.for_config(args.config))
        print(f"rolled back {result.version_before} -> {result.version_after} ({result.reason})")
    return 0


def _previous_backup(config: str) -> str:
    from usp_core.config.mutation import list_backups

    backups = list_backups(config)
    if not backups:
        raise UserError(f"no backup of {config} to diff against; pass a second config file")
    return str(backups[-1])


def cmd_audit(args: argparse.Namespace) -> int:
    from usp_core.config.audit import anchor_path, reanchor_audit_log, verify_audit_log
    from usp_core.config.mutation import resolve_audit_log

    log = args.log or resolve_audit_log(args.config, _load(args))
    if not Path(log).exists():
        if anchor_path(log).exists():
            print(f"{log}: TAMPERED, truncated: the log is gone but its anchor {anchor_path(log)} remains")
            return 1
        raise FileNotFoundError(f"audit log {log} does not exist")
    if args.audit_command == "reanchor":
        reanchor_audit_log(log)
        print(f"{log}: anchored as it stands; verify now trusts every line up to here")
        return 0
    ok, problems = verify_audit_log(log)
    for problem in problems:
        print(problem)
    print(f"{log}: {'OK, hash chain intact' if ok else 'TAMPERED'}")
    return 0 if ok else 1


def cmd_ingest(args: argparse.Namespace) -> int:
    from usp_core.inference import PredictionStore, ingest_file, ingest_frame, observation_files

    if not args.paths and not args.bundled:
        raise UserError("name at least one FILE or DIR, or --bundled")
    store = PredictionStore(args.db)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    results = [ingest_file(f, store, log=log) for f in observation_files(args.paths)]
    if args.bundled:
        from usp_core.data.real import DEV_SERIES, load_dev_panel

        panel, _ = load_dev_panel(DEV_SERIES[: args.series] if args.series else None)
        results.append(ingest_frame(panel, store, source="bundled dev series"))
        log(f"bundled dev series: {results[-1].appended} appended, {results[-1].skipped} already stored")
    appended = sum(r.appended for r in results)
    quarantined = sum(r.quarantined for r in results)
    print(f"{appended} observations appended, {sum(r.skipped for r in results)} already stored, {quarantined} "
          f"quarantined, from {len(results)} source(s) into {store.path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from usp_core.inference import PredictionStore, run_inference

    if not Path(args.file).is_file():
        raise FileNotFoundError(f"observation file {args.file} does not exist")
    store = PredictionStore(args.db)
    result = run_inference(args.file, _load(args), store, run_id="cli", now_ns=None if args.replay else time.time_ns(),
                           log=lambda m: print(m, file=sys.stderr))
    print(f"{result.predictions_written} predictions and {result.states_written} states written to {store.path}; "
          f"{result.quarantined} rows quarantined {result.quarantine_reasons or ''}".rstrip())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from usp_core.bench import render_markdown, run_bench

    print(render_markdown(run_bench(args.out, quick=args.quick, budget_s=args.budget)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usp", description="Universal Stochastic Predictor: pipeline commands.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=str(config_path()), help="config file (default $USP_CONFIG_PATH or "
                       "config/config.toml under the project root)")

    def db_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", default=None, help="DuckDB store (default $USP_DUCKDB_PATH or $DAGSTER_HOME/usp.duckdb)")

    def add(name: str, func, help_text: str, *, config: bool = True, panel: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            config_option(p)
        if panel:
            p.add_argument("--series", type=int, default=0, help="use the first N series (0: all)")
            p.add_argument("--length", type=int, default=0, help="keep the newest N points per series (0: all)")
            if name != "demo":
                p.add_argument("--data", default=None, metavar="FILE",
                               help="observations from this CSV/Parquet file instead of the observation store")
                db_option(p)
        p.set_defaults(func=func)
        return p

    p = add("demo", cmd_demo, "Run the whole pipeline on the bundled data with embedded stores (make demo).",
            config=False, panel=True)
    p.add_argument("--trials", type=int, default=0, help="fast-tuning trials (default: the demo's small budget)")

    p = add("backtest", cmd_backtest, "Walk-forward backtest of the config on the bundled panel.", panel=True)
    p.add_argument("--include", choices=("tuning", "holdout", "all"), default="all", help="folds to score")

    p = add("tune", cmd_tune, "Run or resume an Optuna campaign (the trial budget is a total).", panel=True)
    p.add_argument("--tier", choices=("fast", "deep"), required=True)
    p.add_argument("--trials", type=int, default=None, help="total trial budget (default: meta_optimization.n_trials)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default $USP_OPTUNA_STORAGE or a journal file)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes on the same study, each on its own core (default 0: one per core)")
    p.add_argument("--campaign", default=None,
                   help="campaign name: study usp-<campaign>-<tier>, one MLflow parent run (default <tier>-tuning)")

    p = add("promote", cmd_promote, "Gate the best trial of a campaign against the champion and promote it.",
            panel=True)
    p.add_argument("--tier", choices=("fast", "deep"), default="fast")
    p.add_argument("--storage", default=None, help="Optuna storage URL of the campaign")
    p.add_argument("--campaign", default=None, help="campaign name given to `usp tune` (default <tier>-tuning)")

    p = add("config", cmd_config, "Show, diff or roll back config/config.toml.", config=False)
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the config", description="Print the config (one section).")
    show.add_argument("--section", default=None)
    diff = csub.add_parser("diff", help="differences against another config (default: the last backup)",
                           description="Differences between OTHER (default: the newest backup) and the config.")
    diff.add_argument("other", nargs="?", default=None)
    rb = csub.add_parser("rollback", help="restore a previous config atomically (audited)",
                         description="Restore a previous config atomically; re-points the registry alias.")
    rb.add_argument("--to", default=None, metavar="VERSION", help="config version to restore (default: previous)")
    for leaf in (show, diff, rb):
        config_option(leaf)

    p = add("audit", cmd_audit, "Audit log commands.", config=False)
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = asub.add_parser("verify", help="verify the hash chain of the audit log",
                             description="Verify the hash chain of the mutation audit log.")
    reanchor = asub.add_parser("reanchor", help="accept the log as it stands (after reviewing it)",
                               description="Anchor the audit log as it stands: for a reviewed log written before "
                                           "anchors existed, or after a deliberate repair.")
    for leaf in (verify, reanchor):
        leaf.add_argument("--log", default=None, help="audit log path (default: audit.audit_log of the config)")
        config_option(leaf)

    p = add("ingest", cmd_ingest, "Append observation files (CSV/Parquet; a directory: all of them) to the "
            "observation store; bad rows are quarantined with a reason, replays add nothing.", config=False)
    p.add_argument("paths", nargs="*", metavar="FILE|DIR", help="columns series_id, ts, value")
    p.add_argument("--bundled", action="store_true", help="also ingest the bundled dev series")
    p.add_argument("--series", type=int, default=0, help="with --bundled: the first N bundled series (0: all)")
    db_option(p)

    p = add("predict", cmd_predict, "Predict from an observation file into DuckDB (same path as the sensor).")
    p.add_argument("file", help="CSV or Parquet with columns series_id, ts, value")
    p.add_argument("--replay", action="store_true",
                   help="treat each row as observed at its own timestamp (historical files); default: the file "
                        "arrives now, and rows later than the staleness rules allow are flagged stale")
    db_option(p)

    p = add("bench", cmd_bench, "Run the benchmarks and write bench/results.", config=False)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="small grid")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the benchmark may take; shapes that would not finish are skipped (default 570, quick 240)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``usp`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("usp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            print(f"usp: error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
