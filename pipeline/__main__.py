"""``python -m pipeline {sample-data,ingest,tune,train,evaluate,export,run,report,keygen}``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import artifacts as A
from pipeline import console
from pipeline.artifacts import PipelineError
from pipeline.config import Config, ConfigError, load_config

STAGES = ("ingest", "tune", "train", "evaluate", "export")

EPILOG = """\
configuration: ./pipeline.toml (or --config FILE; configs/digits.toml is the bundled example),
then each --set section.key=value in order, e.g. --set data.source=churn.csv --set
train.epochs=5 --set 'data.split={train=0.8,val=0.1,test=0.1}'.
Each model (model.name, default: the data file's name) keeps its schema and runs in
artifacts/NAME/; later stages work on its newest run (artifacts/NAME/LATEST) unless --run-id.
exit codes: 0 ok, 1 stage failed (message on stderr), 2 invalid configuration or arguments."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Data → tuned, trained, evaluated model → new TF Serving model version.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default: ./pipeline.toml if present)")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable)",
    )
    common.add_argument("--run-id", help="work in artifacts/NAME/RUN_ID (default: newest run)")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also TensorFlow's start-up lines and Keras' warnings",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "sample-data", parents=[common], help="write a bundled scikit-learn dataset (offline)"
    )
    p.add_argument("--dataset", default="digits", help="digits | breast_cancer | wine | diabetes")
    p.add_argument("--out", default=None, help="output path (default: data/DATASET[.csv])")
    sub.add_parser("ingest", parents=[common], help="source → shards, stats, schema, data gate")
    sub.add_parser("tune", parents=[common], help="keras-tuner search → hparams.json")
    sub.add_parser("train", parents=[common], help="train with the best (or default) hparams")
    sub.add_parser("evaluate", parents=[common], help="test-split metrics, report and plots")
    sub.add_parser("export", parents=[common], help="publish MODEL_BASE_PATH/NAME/VERSION/")
    p = sub.add_parser(
        "report", parents=[common], help="one self-contained HTML page for a run (report.html)"
    )
    p.add_argument(
        "--audit",
        default="production/audit.jsonl",
        help="promotion audit log for the version's history (default %(default)s)",
    )
    p.add_argument("--out", help="where to write the page (default: RUN/report.html)")
    p = sub.add_parser(
        "keygen",
        parents=[common],
        help="new Ed25519 key pair for signing exports (export.signing_key, promote.public_key)",
    )
    p.add_argument(
        "--out", default="keys/signing.pem", help="private key path (default %(default)s)"
    )
    p = sub.add_parser("run", parents=[common], help="run several stages in order")
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default: all)",
    )
    p.add_argument("--skip-tune", action="store_true", help="train with default hyperparameters")
    return parser


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.run_id:
        overrides.append(f"run_id={args.run_id!r}".replace("'", '"'))
    return load_config(args.config, overrides)


def run_stage(stage: str, cfg: Config) -> None:
    """Run one stage and print its one-paragraph summary."""
    if stage == "ingest":
        from pipeline.ingest import ingest

        result = ingest(cfg)
        print(
            f"ingest: {result.run_dir} train={result.counts['train']} "
            f"val={result.counts['val']} test={result.counts['test']} "
            f"bad={result.counts['bad']} warnings={len(result.anomalies)}"
        )
    elif stage == "tune":
        from pipeline.tune import tune

        tune(cfg)
    elif stage == "train":
        from pipeline.train import train

        train(cfg)
    elif stage == "evaluate":
        from pipeline.evaluate import evaluate

        evaluate(cfg)
    elif stage == "export":
        from pipeline.export import export

        export(cfg)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(stage)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.configure(quiet=args.quiet, verbose=args.verbose)
    try:
        cfg = _config(args)
        if args.command == "sample-data":
            from pipeline.sample_data import write_sample

            out = args.out or (
                f"data/{args.dataset}" if args.dataset == "digits" else f"data/{args.dataset}.csv"
            )
            print(f"sample-data: wrote {write_sample(args.dataset, out)}")
            return 0
        if args.command == "keygen":
            from pipeline.signing import generate_keys

            public = generate_keys(Path(args.out))
            print(
                f"keygen: private key {args.out} (keep it secret: set export.signing_key to it "
                f"where models are exported), public key {public} (set promote.public_key to "
                "it where promotions run)"
            )
            return 0
        if args.command == "report":
            from pipeline.report import write_report

            run_dir = A.resolve_run_dir(cfg.model_dir, cfg.run_id)
            out = write_report(run_dir, Path(args.audit), Path(args.out) if args.out else None)
            print(f"report: {out}")
            return 0
        if args.command != "ingest":  # ingest imports TensorFlow only to read TFRecord files
            console.quiet_tensorflow()
        if args.command == "run":
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            unknown = [s for s in stages if s not in STAGES]
            if unknown:
                raise ConfigError(f"--stages: unknown stage {unknown[0]!r}; expected {STAGES}")
            if args.skip_tune or not cfg.tune.enabled:
                stages = [s for s in stages if s != "tune"]
            if not cfg.run_id:
                # The run owns its run id from the first stage to the last: an ingest started
                # beside it (which moves artifacts/LATEST) cannot redirect its later stages.
                run_id = (
                    A.new_run_id()
                    if "ingest" in stages
                    else A.resolve_run_dir(cfg.model_dir, "").name
                )
                cfg = dataclasses.replace(cfg, run_id=run_id)
        else:
            stages = [args.command]
        for stage in stages:
            with console.step(stage):
                run_stage(stage, cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
