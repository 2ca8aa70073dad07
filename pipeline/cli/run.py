"""`sinkstream run`: the streaming service (Kafka in, annotations out, checkpoints in Redis)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.common import positive_float
from pipeline.settings import load_settings

# The accelerator failed (not out of memory): restart the process; it resumes from its last checkpoints.
EXIT_DEVICE_FAILURE = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the streaming service",
        description=(
            "Consume text records from kafka.input_topic, keep one StreamingLLM session per record key, publish "
            "JSON annotations (schema sinkstream.annotation/v1) to kafka.output_topic and checkpoint every "
            "stream to Redis, so a restart or a rebalance resumes exactly where it stopped. Settings come from "
            "--config (default ./config.yaml) and SINKSTREAM_* environment variables; with empty broker/Redis "
            "addresses the embedded stack from `sinkstream stack up` is used. SIGTERM finishes the batch, "
            "checkpoints, commits and exits 0. A failure of the GPU other than out of memory (illegal memory "
            "access, device-side assert) exits 3 without a checkpoint: restart it, it resumes from the last one."
        ),
    )
    p.add_argument("--config", type=Path, default=None, help="YAML settings file (default ./config.yaml)")
    p.add_argument(
        "--exit-when-idle", type=positive_float, default=None, metavar="SECONDS",
        help="stop (with a final checkpoint) after this many seconds without records; default: run forever",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.device_errors import DeviceFailure
    from pipeline.logs import configure_logging
    from pipeline.service import metrics
    from pipeline.service.wiring import build_service

    settings = load_settings(args.config)
    # What the command line did not say, the settings decide: the format without --log-format, the level when
    # --log-level is left at the parser's default (INFO), so `log_level: DEBUG` in config.yaml also applies
    # under `--log-format json`.
    level = settings.log_level if args.log_level == "INFO" else args.log_level
    configure_logging(args.log_format or settings.log_format, level)
    service = build_service(settings)
    if settings.service.metrics_port:
        metrics.serve(settings.service.metrics_host, settings.service.metrics_port, service.health)
    try:
        return service.run(idle_exit_s=args.exit_when_idle)
    except DeviceFailure:  # logged by the service (service.device_failed); the orchestrator restarts the pod
        return EXIT_DEVICE_FAILURE
