"""Command line (edge): ``ksup start`` and friends. Parses options into Settings, sets up
logging, runs the Supervisor, exits with its code. Bad input gets one line and a non-zero code."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from supervisor import __version__
from supervisor import config as cfgmod
from supervisor.contract.exitcodes import ExitCode
from supervisor.errors import ConfigError
from supervisor.logs import resolve_format, setup_logging


def fail(message: str, code: ExitCode) -> None:
    click.echo(f"ksup: error: {message}", err=True)
    sys.exit(int(code))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ksup")
def main() -> None:
    """ksup: run Kafka consumer workers that never lose a message on stop, upgrade or rebalance."""


@main.command(context_settings={"show_default": True})
@click.argument("handler")
@click.option("-w", "--workers", type=int, default=1, help="Number of worker processes.")
@click.option("-b", "--bootstrap-servers", default="", help="Kafka bootstrap servers, host:port[,...].")
@click.option("-g", "--group", default="", help="Consumer group id.")
@click.option("-t", "--topic", "topics", multiple=True, help="Topic to consume (repeatable).")
@click.option("-X", "kafka_props", multiple=True, metavar="KEY=VALUE",
              help="Any librdkafka consumer property (repeatable), as in kcat.")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with these options as keys and a [kafka] table; flags override it.")
@click.option("--group-protocol", type=click.Choice(cfgmod.GROUP_PROTOCOLS), default="classic",
              help="classic (cooperative-sticky) or consumer (KIP-848, Kafka 4+).")
@click.option("--graceful-timeout", type=float, default=30.0,
              help="Seconds from a stop request until unfinished workers are killed.")
@click.option("--quick-timeout", type=float, default=5.0,
              help="The same after a second Ctrl+C or SIGQUIT.")
@click.option("--broker-timeout", type=float, default=30.0,
              help="Seconds a starting worker waits for the broker before giving up.")
@click.option("--revoke-timeout", type=float, default=10.0,
              help="Seconds a revocation waits for the message in flight of the revoked partitions.")
@click.option("--restart-delay", type=float, default=1.0,
              help="First delay before restarting a dead worker (doubles per death, capped at 30s).")
@click.option("--receipt", type=click.Path(dir_okay=False),
              help="Write the shutdown receipt (per partition: last processed, committed) as JSON here.")
@click.option("--log-format", type=click.Choice(cfgmod.LOG_FORMATS), default="auto",
              help="auto = text on a terminal, JSON lines otherwise.")
@click.option("--log-level", default="info", help="debug, info, warning, error.")
@click.pass_context
def start(ctx: click.Context, /, handler: str, kafka_props: tuple[str, ...], config_file: str | None,
          **flags: Any) -> None:
    """Run HANDLER (module:function) for every message, in N supervised worker processes.

    SIGTERM or Ctrl+C drains: workers stop fetching, finish the message in flight, commit and
    leave the group; the exit code says how it went (see the README's exit-code table).
    """
    try:
        values: dict[str, Any] = cfgmod.load_file(config_file) if config_file else {}
        for name, value in flags.items():
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT or name not in values:
                if name == "topics":
                    if value or "topics" not in values:
                        values["topics"] = tuple(value)
                else:
                    values[name] = value
        kafka = dict(values.get("kafka", {}))
        kafka.update(cfgmod.parse_kafka_property(p) for p in kafka_props)
        values["kafka"] = kafka
        values["handler"] = handler
        settings = cfgmod.build(values)
    except ConfigError as exc:
        fail(str(exc), ExitCode.CONFIG)
        return
    log_format = resolve_format(settings.log_format)
    setup_logging(log_format, settings.log_level, "supervisor")
    from supervisor.parent.supervisor import Supervisor

    supervisor = Supervisor(settings, log_format)
    try:
        code = ExitCode(supervisor.run())
    except Exception:
        logging.getLogger("ksup.supervisor").exception("supervisor crashed")
        code = ExitCode.INTERNAL
    if code != ExitCode.OK:
        # The last line of output, for whoever started ksup: what went wrong, as one line.
        click.echo(f"ksup: exit {int(code)} ({code.name}): {supervisor.final_reason(code)}", err=True)
    sys.exit(int(code))
