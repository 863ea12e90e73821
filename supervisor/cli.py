"""Command line (edge): ``ksup start`` and friends. Parses options into Settings, sets up
logging, runs the Supervisor, exits with its code. Bad input gets one line and a non-zero code."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from supervisor import __version__, references
from supervisor import config as cfgmod
from supervisor.contract.exitcodes import ExitCode, VerifyExit
from supervisor.errors import ConfigError, StartupError
from supervisor.logs import SECRET_KEY, resolve_format, secret_values, setup_logging
from supervisor.parent import worker_output


def fail(message: str, code: ExitCode) -> None:
    click.echo(f"ksup: error: {message}", err=True)
    sys.exit(int(code))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ksup")
def main() -> None:
    """ksup: run Kafka consumer workers that never lose a message on stop, upgrade or rebalance."""


@main.command(context_settings={"show_default": True})
@click.argument("handler", required=False)
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
              help="First delay before restarting a dead worker (doubles per death, up to --max-restart-delay).")
@click.option("--max-restart-delay", type=float, default=30.0,
              help="The longest restart delay the doubling reaches.")
@click.option("--handler-timeout", type=float, default=None,
              help="Seconds one message may take; a worker stuck longer is stopped and restarted.")
@click.option("--heartbeat-timeout", type=float, default=30.0,
              help="Seconds a worker may go without reporting before it is killed and restarted.")
@click.option("--max-messages", type=int, default=None,
              help="Recycle a worker (drain, start a fresh one) after about this many messages (+0-10%).")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Recycle a worker whose RSS exceeds SIZE (e.g. 512M, 2G).")
@click.option("--control-socket", type=click.Path(dir_okay=False), default=None,
              help="Unix socket for ksup status/stop/scale/health [default: $XDG_RUNTIME_DIR/ksup/GROUP.sock, "
                   "else /tmp/ksup-UID/GROUP.sock].")
@click.option("--concurrency", type=int, default=1,
              help="Handler threads per worker: different partitions (or keys) in parallel, each in order.")
@click.option("--order-by", type=click.Choice(cfgmod.ORDER_BY), default="partition",
              help="What must stay in order with --concurrency: a partition, or a key within it.")
@click.option("--batch-size", type=int, default=1, help="Give the handler lists of up to N records.")
@click.option("--batch-timeout", type=float, default=1.0, help="Seconds a partial batch waits to fill.")
@click.option("--on-error", default="stop", metavar="POLICIES",
              help="What to do when the handler raises, tried in order: retry, dead-letter, skip, stop "
                   "(e.g. retry,dead-letter). stop: the worker restarts and the message is redelivered.")
@click.option("--retry-attempts", type=int, default=3, help="Retries before the next policy.")
@click.option("--retry-backoff", type=float, default=0.5, help="Seconds before the first retry (doubles).")
@click.option("--dead-letter-topic", default="{topic}.dlq", help="Where dead-letter sends a message.")
@click.option("--poison-after", type=int, default=2,
              help="Worker deaths (crash, kill, hang) on one message before dead-letter/skip applies to it.")
@click.option("--on-worker-exit", default=None, metavar="CMD",
              help="Shell command run whenever a worker ends, with KSUP_SLOT, KSUP_PID, KSUP_EXIT_CODE, "
                   "KSUP_SIGNAL, KSUP_REASON and KSUP_IN_FLIGHT in its environment.")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus /metrics and /livez /readyz /healthz here (e.g. 127.0.0.1:9300); off by default.")
@click.option("--progress-timeout", type=float, default=60.0,
              help="/healthz: a partition with lag whose committed offset stood still this long is unhealthy.")
@click.option("--static-membership/--no-static-membership", default=True,
              help="Give each worker slot a stable group.instance.id, so restarts and rolling reloads "
                   "get the same partitions back without a rebalance.")
@click.option("--instance-id-prefix", default=None,
              help="group.instance.id is PREFIX-SLOT [default: HOST-GROUP].")
@click.option("--instance-id-wait", type=float, default=60.0,
              help="KIP-848: how long a worker keeps retrying a group.instance.id the broker still holds for "
                   "another member (a predecessor that died without leaving holds it until its session "
                   "expires, 45 s by default) before ksup concludes another consumer uses it (exit 8).")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None, help="Write the supervisor's pid here.")
@click.option("--receipt", type=click.Path(dir_okay=False),
              help="Write the shutdown receipt (per partition: last processed, committed) as JSON here.")
@click.option("--log-format", type=click.Choice(cfgmod.LOG_FORMATS), default="auto",
              help="auto = text on a terminal, JSON lines otherwise.")
@click.option("--log-level", default="info", help="debug, info, warning, error.")
@click.pass_context
def start(ctx: click.Context, /, handler: str | None, kafka_props: tuple[str, ...], config_file: str | None,
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
        # Secret references (key:file / key:env) resolved per source, so -X still overrides the file.
        file_keys = list(values.get("kafka", {}))
        from_file, file_vars = references.resolve(values.get("kafka", {}))
        given = [cfgmod.parse_kafka_property(p) for p in kafka_props]
        from_argv, argv_vars = references.resolve(dict(given))
        values["kafka"] = {**from_file, **from_argv}
        values["handler"] = handler or values.get("handler", "")
        if isinstance(values.get("on_error"), str):
            values["on_error"] = tuple(p.strip() for p in values["on_error"].split(",") if p.strip())
        elif isinstance(values.get("on_error"), list):
            values["on_error"] = tuple(values["on_error"])
        if isinstance(values.get("max_memory"), str):
            values["max_memory"] = cfgmod.parse_size(values["max_memory"])
        settings = cfgmod.build(values)
    except ConfigError as exc:
        fail(str(exc), ExitCode.CONFIG)
        return
    from supervisor.parent.receipt import path_problem

    problem = path_problem(settings.receipt) if settings.receipt else None
    if problem:
        fail(problem, ExitCode.CONFIG)
        return
    # Read once: no process ksup starts inherits a variable that held a secret.
    references.forget_variables(file_vars + argv_vars)
    log_format = resolve_format(settings.log_format)
    secrets = secret_values(settings.kafka)
    from supervisor.parent import sink

    # From here on the supervisor's stderr never blocks (a log reader that stops reading).
    out = sink.install()
    setup_logging(log_format, settings.log_level, "supervisor", secrets=secrets, stream=sink.SinkStream(out))
    worker_output.SECRETS[:] = secrets
    worker_output.FORMAT = log_format
    for warning in references.exposure_warnings(SECRET_KEY, (k for k, _ in given), config_file, file_keys):
        logging.getLogger("ksup.supervisor").warning("%s", warning)
    from supervisor.adapters import systemd
    from supervisor.adapters.control import ControlSocketHooks, default_socket_path
    from supervisor.adapters.leftovers import LeftoverProbe
    from supervisor.adapters.pidfile import PidfileHooks
    from supervisor.parent.hooks import AllHooks, Hooks
    from supervisor.parent.supervisor import Supervisor

    identity = None
    if settings.static_membership:
        from supervisor.adapters.identity import IdentityClash, claim

        try:
            identity = claim(settings.bootstrap_servers, settings.group, cfgmod.instance_id_prefix(settings))
        except IdentityClash as exc:
            fail(str(exc), ExitCode.FENCED)
    unit = systemd.own_unit()
    if unit:
        errors, warnings = systemd.check_unit(settings.graceful_timeout, systemd.unit_properties(unit))
        for warning in warnings:
            logging.getLogger("ksup.supervisor").warning("%s", warning)
        if errors:
            fail(errors[0], ExitCode.CONFIG)
    adapters: list[Hooks] = [ControlSocketHooks(settings.control_socket or default_socket_path(settings.group)),
                             systemd.SystemdNotifier()]
    if settings.pidfile:
        adapters.append(PidfileHooks(settings.pidfile))
    if settings.on_worker_exit:
        from supervisor.adapters.exit_command import WorkerExitCommand

        adapters.append(WorkerExitCommand(settings.on_worker_exit))
    if settings.metrics_addr:
        from supervisor.adapters.metrics import MetricsHooks

        adapters.append(MetricsHooks(settings.metrics_addr, settings.progress_timeout))
    # Last: a hook that fails at start (a port in use) must not have started the helper first.
    adapters.append(LeftoverProbe())  # asks the broker once at start (classic static members only)
    supervisor = Supervisor(settings, log_format, AllHooks(*adapters))
    crash = ""
    try:
        code = ExitCode(supervisor.run())
    except StartupError as exc:  # the control socket, pidfile or metrics port could not be set up
        out.close()
        fail(str(exc), ExitCode.CONFIG)
        return
    except Exception as exc:  # a bug, or an OS error at run time: not a configuration problem
        logging.getLogger("ksup.supervisor").exception("supervisor crashed")
        code, crash = ExitCode.INTERNAL, f"supervisor crashed: {type(exc).__name__}: {exc} (the log has the traceback)"
    if code != ExitCode.OK:
        # The last line of output, for whoever started ksup: what went wrong, as one line.
        out.write(f"ksup: exit {int(code)} ({code.name}): {crash or supervisor.final_reason(code)}\n".encode())
    out.close()
    if identity is not None:
        identity.close()
    sys.exit(int(code))


# ---- clients of a running supervisor (over its control socket) ------------------------------------

def _socket_option(f: Any) -> Any:
    f = click.option("-g", "--group", default=None, help="Consumer group of the ksup to talk to.")(f)
    return click.option("--socket", "socket_path", envvar="KSUP_SOCKET", default=None,
                        help="Control socket path (or $KSUP_SOCKET) instead of --group.")(f)


def _ask(socket_path: str | None, group: str | None, body: dict[str, Any], timeout: float | None = 10.0,
         errors_are_fatal: bool = True) -> dict[str, Any]:
    from supervisor.adapters.control import default_socket_path, request

    if socket_path is None:
        if group is None:
            fail("say which ksup: --group NAME (or --socket PATH)", ExitCode.USAGE)
        socket_path = default_socket_path(str(group))
    try:
        reply = request(socket_path, body, timeout)
    except FileNotFoundError:
        fail(f"no ksup is running at {socket_path} (check --group/--socket)", ExitCode.USAGE)
    except PermissionError:
        fail(f"permission denied on {socket_path} (run as the user that started ksup)", ExitCode.USAGE)
    except (OSError, ValueError) as exc:
        fail(f"could not talk to ksup at {socket_path}: {exc}", ExitCode.INTERNAL)
    if errors_are_fatal and not reply.get("ok"):
        fail(str(reply.get("error")), ExitCode.USAGE)
    return reply


@main.command()
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh in place every second (Ctrl+C to leave).")
def status(socket_path: str | None, group: str | None, as_json: bool, watch: bool) -> None:
    """One row per worker: state, partitions, message in flight, counts, committed offsets, lag, RSS."""
    from supervisor.status_view import render

    while True:
        reply = _ask(socket_path, group, {"cmd": "status"})
        reply.pop("ok", None)
        text = json.dumps(reply, indent=2) if as_json else render(reply)
        if not watch:
            click.echo(text)
            return
        # Home + clear, then the table: redrawn in place (click.echo would strip the escapes in a pipe).
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        sys.stdout.flush()
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return


@main.command()
@_socket_option
@click.option("--timeout", type=float, default=None, help="Graceful timeout for this stop (seconds).")
@click.option("--no-wait", is_flag=True, help="Return once the stop was accepted.")
def stop(socket_path: str | None, group: str | None, timeout: float | None, no_wait: bool) -> None:
    """Drain every worker and stop; exits with the supervisor's own exit code."""
    reply = _ask(socket_path, group, {"cmd": "stop", "timeout": timeout, "wait": not no_wait}, timeout=None)
    sys.exit(int(reply.get("exit_code", 0)))


@main.command()
@_socket_option
@click.option("--wait/--no-wait", default=True, help="Return when the roll is done (default) or at once.")
def reload(socket_path: str | None, group: str | None, wait: bool) -> None:
    """Replace every worker, one at a time, with a fresh process running the code installed now.

    With --wait, prints per slot the old pid, the new pid and how long its partitions had no
    consumer; exits non-zero (with the reason) when the roll stopped."""
    reply = _ask(socket_path, group, {"cmd": "reload", "wait": wait}, timeout=None if wait else 10.0,
                 errors_are_fatal=not wait)
    if reply.get("refused"):
        # Nothing was started, so nothing stopped: not a failed roll (3), which a deploy script may
        # answer by rolling back a good release; the roll already under way goes on.
        fail(f"reload refused: {reply.get('error')}", ExitCode.USAGE)
    if not wait:
        click.echo("reload started")
        return
    for r in reply.get("slots", []):
        gap = "-" if r["gap_s"] is None else f"{r['gap_s']:.3f}s"
        click.echo(f"worker {r['slot']}: pid {r['old_pid']} -> {r['new_pid']}, partitions without a consumer {gap}"
                   + (f"  FAILED: {r['error']}" if r["error"] else "")
                   + (f"  NOT DRAINED CLEANLY: the old process {r['old_drain']}" if r.get("old_drain") else ""))
    unclean = ExitCode(int(reply.get("unclean_code", 0)))
    if reply.get("error"):
        also = "; an old worker also did not drain cleanly (see above)" if unclean is not ExitCode.OK else ""
        fail(f"reload stopped: {reply['error']}{also}", ExitCode.BOOT_FAILED)
    if unclean is not ExitCode.OK:
        # The workers were replaced, but a drain was cut short: say so with the code a stop would
        # give for it (the README's table), so a deploy script notices.
        fail(f"reload done in {reply.get('seconds', 0):.1f}s, but an old worker did not drain cleanly (see "
             "above); its unfinished or uncommitted messages will be handled again", unclean)
    click.echo(f"reload done in {reply.get('seconds', 0):.1f}s")


@main.command()
@_socket_option
@click.argument("workers", type=int)
def scale(socket_path: str | None, group: str | None, workers: int) -> None:
    """Change the number of workers (one group-membership change at a time)."""
    reply = _ask(socket_path, group, {"cmd": "scale", "workers": workers})
    click.echo(f"scaling from {reply['was']} to {reply['workers']} workers")


@main.command()
@_socket_option
@click.option("--ready", "readiness", is_flag=True,
              help="Check readiness instead (every worker a settled member of the group; as /readyz).")
def health(socket_path: str | None, group: str | None, readiness: bool) -> None:
    """Exit 0 when healthy, else 1 with the reasons (the same verdict as /healthz; see the README's
    "Readiness and health"). With --ready: exit 0 when ready (as /readyz and READY=1)."""
    cmd, key, word = ("ready", "ready", "not ready") if readiness else ("health", "healthy", "unhealthy")
    reply = _ask(socket_path, group, {"cmd": cmd}, timeout=5.0)
    if reply[key]:
        click.echo(key)
        return
    for problem in reply["problems"]:
        click.echo(f"{word}: {problem}", err=True)
    sys.exit(1)


@main.command()
@click.option("-b", "--bootstrap-servers", required=True, help="The cluster to verify against.")
@click.option("--messages", type=int, default=20_000, show_default=True, help="Messages to produce.")
@click.option("--duration", type=float, default=None, metavar="SECONDS",
              help="Soak: produce at --rate for this long instead of --messages (progress every 10 s).")
@click.option("--partitions", type=int, default=8, show_default=True, help="Partitions of the scratch topic.")
@click.option("-w", "--workers", type=int, default=4, show_default=True)
@click.option("--rate", type=int, default=2_000, show_default=True, help="Messages produced per second.")
@click.option("--faults", default=None,
              help="Faults to inject, comma-separated (empty for none): sigterm, kill, supervisor-kill, reload, "
                   "scale, scale-flap, exception, hang, poison (the default), and broker-restart / broker-pause (the "
                   "default too when their commands are given).")
@click.option("--broker-restart-command", default=None, metavar="CMD",
              help="Shell command that restarts a broker and returns once it serves again (the broker-restart fault).")
@click.option("--fault-interval", type=float, default=3.0, show_default=True, help="Seconds between faults.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the fault schedule (reproducible).")
@click.option("-X", "kafka_props", multiple=True, metavar="KEY=VALUE", help="librdkafka property (security etc.).")
@click.option("--keep-topic", is_flag=True, help="Do not delete the scratch topic at the end.")
@click.option("--broker-pause-command", default=None, metavar="CMD",
              help="Shell command that freezes a broker (the broker-pause fault; with --broker-resume-command).")
@click.option("--broker-resume-command", default=None, metavar="CMD", help="Shell command that thaws it again.")
@click.option("--max-gap", type=float, default=10.0, show_default=True,
              help="Fail when a partition with messages waiting had no consumer for longer (seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(bootstrap_servers: str, messages: int, duration: float | None, partitions: int, workers: int, rate: int,
           faults: str | None,
           broker_restart_command: str | None, fault_interval: float, seed: int, kafka_props: tuple[str, ...],
           keep_topic: bool, broker_pause_command: str | None, broker_resume_command: str | None, max_gap: float,
           as_json: bool) -> None:
    """Prove at-least-once on your own cluster: a scratch topic, N messages, ksup workers with a
    recording handler, faults on a seeded schedule; exits 0 only when nothing was lost."""
    from supervisor.verify.run import DEFAULT_FAULTS, Fault, Plan, report, run
    from supervisor.verify.run import as_json as to_json

    if faults is None:
        chosen = DEFAULT_FAULTS + ((Fault.BROKER_RESTART,) if broker_restart_command else ()) + \
            ((Fault.BROKER_PAUSE,) if broker_pause_command and broker_resume_command else ())
    else:
        names = [f.strip() for f in faults.split(",") if f.strip()]
        known = {f.value: f for f in Fault}
        unknown = [n for n in names if n not in known]
        if unknown:
            fail(f"unknown fault(s) {', '.join(unknown)} (choose from {', '.join(known)})", ExitCode.USAGE)
        chosen = tuple(known[n] for n in names)
    if Fault.BROKER_RESTART in chosen and not broker_restart_command:
        fail("the broker-restart fault needs --broker-restart-command (a command that restarts a broker "
             "and returns once it is back)", ExitCode.USAGE)
    if Fault.BROKER_PAUSE in chosen and not (broker_pause_command and broker_resume_command):
        fail("the broker-pause fault needs --broker-pause-command and --broker-resume-command (commands that "
             "freeze a broker and thaw it, e.g. with kill -STOP / kill -CONT)", ExitCode.USAGE)
    try:
        kafka, variables = references.resolve(dict(cfgmod.parse_kafka_property(p) for p in kafka_props))
    except ConfigError as exc:
        fail(str(exc), ExitCode.CONFIG)
        return
    references.forget_variables(variables)  # verify's ksup and its workers get the values from a file
    setup_logging("text", "warning", "supervisor", secrets=secret_values(kafka))
    if duration is not None:
        messages = max(int(duration * rate), 1)
    plan = Plan(bootstrap_servers, messages, partitions, workers, rate, chosen, fault_interval, seed, kafka, keep_topic,
                broker_restart_command=broker_restart_command, max_gap=max_gap,
                broker_pause_command=broker_pause_command, broker_resume_command=broker_resume_command,
                timeout=max(600.0, 2 * messages / max(rate, 1) + 300))
    try:
        outcome = run(plan, show_progress=not as_json)
    except Exception as exc:  # CouldNotRun: a broker that does not answer, its ksup died, the producer failed
        click.echo(f"ksup verify: could not run: {exc}", err=True)
        sys.exit(VerifyExit.COULD_NOT_RUN)
    click.echo(to_json(outcome) if as_json else report(outcome))
    if outcome.interrupted:
        sys.exit(VerifyExit.COULD_NOT_RUN if outcome.lost == 0 else VerifyExit.FAILED)
    sys.exit(VerifyExit.PROVED if outcome.ok else VerifyExit.FAILED)
