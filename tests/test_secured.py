"""A secured cluster (issue 15), on a broker of this module's own with a SASL_PLAINTEXT listener
(PLAIN and SCRAM-SHA-512) next to its PLAINTEXT one, which the tests' own admin, producer and
offset checks use: ksup consumes through SASL with nothing lost; a wrong password, an unknown
user or a mechanism the broker lacks is exit 13 AUTH_FAILED at once (not after --broker-timeout),
naming the mechanism and the user; the password, given by a file reference, an environment
reference or a config file, never shows in any log (JSON or text, librdkafka's debug lines
included), status, metrics, the receipt, or any ksup process's argv or environment; passed with
-X on the command line, the same check finds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO, ksup_cli, read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, free_port_unused, produce_sequence
from tests.localkafka import LocalKafka, Secured

pytestmark = pytest.mark.kafka

USER, PASSWORD = "alice", "Pw-alice-7f3c9e"
REVOKED_USER, REVOKED_PASSWORD = "bob", "Pw-bob-51d0aa"  # deleted by one test while ksup runs
REAUTH_MS = 4000  # the broker makes clients re-authenticate (KIP-368) this often
TLS_KEY_PASSWORD = "Key-pw-0c4e12"  # encrypts the client certificate's key
MESSAGES, PARTITIONS = 20, 2

# A handler that also writes the password it can read (from a file named in its environment:
# the path is no secret) to its log and stdout: both must come out redacted.
SECRET_ECHO = '''
import logging, os
from tests.handlers.recording import process as record

SECRET = open(os.environ["KSUP_TEST_SECRET_FILE"]).read().strip()
_said = False


def process(record_):
    global _said
    if not _said:
        _said = True
        logging.getLogger("handler").warning("handler logs the password %s", SECRET)
        print(f"handler prints the password {SECRET}", flush=True)
    record(record_)
'''


@pytest.fixture(scope="module")
def secured() -> Iterator[LocalKafka]:
    broker = LocalKafka(secured=Secured(users={USER: PASSWORD, REVOKED_USER: REVOKED_PASSWORD}, reauth_ms=REAUTH_MS,
                                        tls_key_password=TLS_KEY_PASSWORD))
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


def sasl_args(mechanism: str, user: str = USER) -> list[str]:
    return ["-X", "security.protocol=SASL_PLAINTEXT", "-X", f"sasl.mechanism={mechanism}",
            "-X", f"sasl.username={user}"]


def _proc(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read().decode(errors="replace")


def places_holding(secret: str, places: dict[str, str]) -> list[str]:
    return sorted(where for where, text in places.items() if secret in text)


# (how the password is given, mechanism, log format); "argv" is the way not to do it, which the
# same check must catch.
WAYS = [("file", "PLAIN", "json"), ("file", "SCRAM-SHA-512", "text"), ("config", "SCRAM-SHA-512", "json"),
        ("config", "PLAIN", "text"), ("env", "SCRAM-SHA-512", "json"), ("argv", "PLAIN", "json")]
# Where each way is expected to leave the password: an environment reference is read from the
# supervisor's own environment, whose /proc copy keeps it (the variable is removed before any
# worker starts); -X on the command line is in the supervisor's argv for every local user to see.
EXPECTED = {"file": [], "config": [], "env": ["supervisor environ"], "argv": ["supervisor cmdline"]}


@pytest.mark.parametrize(("way", "mechanism", "fmt"), WAYS)
def test_consumes_over_sasl_and_the_password_never_shows(ksup, secured, names, tmp_path, way, mechanism, fmt):
    topic, group = names
    create_topic(secured.bootstrap, topic, PARTITIONS)
    produce_sequence(secured.bootstrap, topic, MESSAGES, partitions=PARTITIONS)
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text(PASSWORD + "\n")  # as `echo pw > file` or a Kubernetes secret leaves it
    (tmp_path / "secret_echo.py").write_text(SECRET_ECHO)
    record, port = tmp_path / "record.txt", free_port_unused()
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SECRET_FILE": str(secret_file),
           "PYTHONDONTWRITEBYTECODE": "1"}
    extra = [*sasl_args(mechanism), "-X", "debug=security,conf", "--log-level", "debug", "--log-format", fmt,
             "--metrics-addr", f"127.0.0.1:{port}", "-w", "2"]
    if way == "file":
        extra += ["-X", f"sasl.password:file={secret_file}"]
    elif way == "env":
        env["KSUP_TEST_KAFKA_PASSWORD"] = PASSWORD
        extra += ["-X", "sasl.password:env=KSUP_TEST_KAFKA_PASSWORD"]
    elif way == "config":
        (tmp_path / "ksup.toml").write_text(f'[kafka]\n"sasl.password" = "{PASSWORD}"\n')
        (tmp_path / "ksup.toml").chmod(0o644)
        extra += ["--config", str(tmp_path / "ksup.toml")]
    else:
        extra += ["-X", f"sasl.password={PASSWORD}"]
    run = ksup("secret_echo:process", secured.sasl_bootstrap, topic, group, cwd=tmp_path, env=env, extra=extra)
    wait_until(lambda: len(read_record(record)) >= MESSAGES, 60, f"all consumed over SASL {mechanism}")
    wait_until(lambda: committed_offsets(secured.bootstrap, group, topic, PARTITIONS) == {0: 10, 1: 10}, 60,
               "all committed", 0.5)
    status = ksup_cli("status", "--json", "-g", group)
    assert status.returncode == 0, status.stderr
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    places = {"status": status.stdout, "metrics": metrics}
    workers = run.worker_pids()
    assert len(workers) == 2
    for who, pid in (("supervisor", run.proc.pid), *((f"worker {i}", w) for i, w in enumerate(workers))):
        places[f"{who} cmdline"], places[f"{who} environ"] = _proc(pid, "cmdline"), _proc(pid, "environ")
    assert "KSUP_TEST_KAFKA_PASSWORD" not in places["worker 0 environ"] + places["worker 1 environ"]
    assert run.stop() == 0, run.tail()
    places["log"], places["receipt"] = run.log_text(), run.receipt_path.read_text()

    seen = {(p, o) for p, o, _ in read_record(record)}
    assert seen == {(p, o) for p in range(PARTITIONS) for o in range(MESSAGES // PARTITIONS)}, "nothing lost"
    log = places["log"]
    # The checks below can see what they look for: librdkafka's security debug lines (SASL
    # handshake), its config dump, and the handler's own line, all with the password blanked.
    assert "Broker supported SASL mechanisms: PLAIN,SCRAM-SHA-512" in log, log[-2000:]
    assert "sasl.password" in log and "handler logs the password ***" in log and \
        "handler prints the password ***" in log, run.tail(60)
    assert places_holding(PASSWORD, places) == EXPECTED[way]
    # Written-out passwords get a warning naming the way out; references get none.
    warned = {"argv": "-X sasl.password is on the command line", "config": "ksup.toml holds sasl.password and every "
              "local user can read it (mode 644); chmod 600 it"}
    assert (warned[way] in log) if way in warned else ("every local user can read it" not in log), way


CHECK_LOGIN = "check sasl.username and the password"


@pytest.mark.compat  # rests on librdkafka's error codes and texts: checked on the oldest supported one too
@pytest.mark.parametrize(("mechanism", "user", "password", "detail", "fix"), [
    ("PLAIN", USER, "wrong-password", "Invalid username or password", CHECK_LOGIN),
    ("SCRAM-SHA-512", USER, "wrong-password", "invalid credentials with SASL mechanism SCRAM-SHA-512", CHECK_LOGIN),
    ("SCRAM-SHA-512", "mallory", PASSWORD, "invalid credentials with SASL mechanism SCRAM-SHA-512", CHECK_LOGIN),
    ("SCRAM-SHA-256", USER, PASSWORD, "Unsupported SASL mechanism", "set sasl.mechanism to one the broker offers"),
])
def test_refused_credentials_are_auth_failed_at_once(ksup, secured, names, tmp_path, mechanism, user, password,
                                                      detail, fix):
    """Exit 13 with one line naming the mechanism, the user and the fix, well before
    --broker-timeout (20 s here; before ksup knew, it waited all of it and said exit 7)."""
    topic, group = names
    create_topic(secured.bootstrap, topic, 1)
    (tmp_path / "ksup.toml").write_text(f'[kafka]\n"sasl.password" = "{password}"\n')
    t0 = time.monotonic()
    run = ksup("tests.handlers.recording:process", secured.sasl_bootstrap, topic, group,
               env={"KSUP_TEST_RECORD": str(tmp_path / "r.txt")}, workers=2,
               extra=[*sasl_args(mechanism, user), "--config", str(tmp_path / "ksup.toml"), "--broker-timeout", "20"])
    code = run.wait(45)
    took = time.monotonic() - t0
    print(f"{mechanism} {user}: exit {code} after {took:.2f}s")
    last = run.log_text().strip().splitlines()[-1]
    assert code == 13, run.tail()
    assert last.startswith("ksup: exit 13 (AUTH_FAILED): "), last
    assert mechanism in last and repr(user) in last and detail in last, last
    assert fix in last, "names the settings to fix"
    assert took < 10, f"exit 13 took {took:.1f}s: it waited for the broker timeout"
    assert password not in run.log_text()
    assert read_record(tmp_path / "r.txt") == []


def test_a_credential_deleted_while_running_is_auth_failed(ksup, secured, names, tmp_path):
    """librdkafka re-authenticates a connection only when the broker asks for it
    (connections.max.reauth.ms, KIP-368; without it a running consumer keeps its authenticated
    connections, and deleting its credential changes nothing until it reconnects). With it, the
    first refused re-authentication stops the worker with 13 and ksup halts with 13; what was
    finished before is committed."""
    from confluent_kafka.admin import AdminClient, ScramMechanism, UserScramCredentialDeletion

    topic, group = names
    create_topic(secured.bootstrap, topic, 1)
    produce_sequence(secured.bootstrap, topic, 5)
    (tmp_path / "pw").write_text(REVOKED_PASSWORD)
    record = tmp_path / "r.txt"
    run = ksup("tests.handlers.recording:process", secured.sasl_bootstrap, topic, group,
               env={"KSUP_TEST_RECORD": str(record)},
               extra=[*sasl_args("SCRAM-SHA-512", REVOKED_USER), "-X", f"sasl.password:file={tmp_path / 'pw'}"])
    wait_until(lambda: committed_offsets(secured.bootstrap, group, topic, 1) == {0: 5}, 60, "consumed and committed")
    admin = AdminClient({"bootstrap.servers": secured.bootstrap})
    for future in admin.alter_user_scram_credentials(
            [UserScramCredentialDeletion(REVOKED_USER, ScramMechanism.SCRAM_SHA_512)]).values():
        future.result(30)
    t0 = time.monotonic()
    code = run.wait(REAUTH_MS / 1000 + 30)
    print(f"exit {code} {time.monotonic() - t0:.2f}s after the credential was deleted")
    last = run.log_text().strip().splitlines()[-1]
    assert code == 13, run.tail()
    assert last.startswith("ksup: exit 13 (AUTH_FAILED): ") and "re-authentication" in last, last
    assert repr(REVOKED_USER) in last and "SCRAM-SHA-512" in last, last
    assert sorted(o for _, o, _ in read_record(record)) == [0, 1, 2, 3, 4]
    assert committed_offsets(secured.bootstrap, group, topic, 1) == {0: 5}


def test_verify_on_a_secured_cluster_keeps_the_password_out_of_argv(secured, tmp_path):
    """`ksup verify` takes the same -X (references included) and hands the Kafka properties to
    its own ksup in a config file of the owner's only, never on that ksup's command line; a
    variable read by an :env reference is not inherited by that ksup or its workers."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "verify", "-b", secured.sasl_bootstrap, *sasl_args("SCRAM-SHA-512"),
         "-X", "sasl.password:env=KSUP_TEST_KAFKA_PASSWORD", "--messages", "300", "--rate", "300",
         "--partitions", "2", "-w", "1", "--faults", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "KSUP_TEST_KAFKA_PASSWORD": PASSWORD}, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        def a_worker_seen() -> bool:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen[child.pid] = " ".join(child.cmdline()) + "\0" + "\0".join(
                        f"{k}={v}" for k, v in child.environ().items())
            except psutil.Error:
                pass
            return any("supervisor.child" in text for text in seen.values())

        wait_until(a_worker_seen, 60, "verify's ksup and its worker")
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "produced        300" in out and "lost            0" in out and "OK: nothing lost" in out, out
    assert PASSWORD not in out
    assert not [pid for pid, text in seen.items() if PASSWORD in text], "the password is in a process's argv or environ"


def tls_args(broker: LocalKafka, key_password_file: Path | None, trust_broker: bool = True) -> list[str]:
    d = broker.tls_dir
    args = ["-X", "security.protocol=SSL"] + (["-X", f"ssl.ca.location={d / 'ca.pem'}"] if trust_broker else [])
    if key_password_file is not None:
        args += ["-X", f"ssl.certificate.location={d / 'client.pem'}", "-X", f"ssl.key.location={d / 'client.key'}",
                 "-X", f"ssl.key.password:file={key_password_file}"]
    return args


def test_consumes_over_tls_with_a_client_certificate(ksup, secured, names, tmp_path):
    """An SSL listener that requires a client certificate; the key's password comes from a file
    reference and shows nowhere (librdkafka's security debug lines included)."""
    topic, group = names
    create_topic(secured.bootstrap, topic, PARTITIONS)
    produce_sequence(secured.bootstrap, topic, MESSAGES, partitions=PARTITIONS)
    (tmp_path / "key-pw").write_text(TLS_KEY_PASSWORD + "\n")
    record = tmp_path / "r.txt"
    run = ksup("tests.handlers.recording:process", secured.ssl_bootstrap, topic, group, workers=2,
               env={"KSUP_TEST_RECORD": str(record)},
               extra=[*tls_args(secured, tmp_path / "key-pw"), "-X", "debug=security,conf", "--log-level", "debug"])
    wait_until(lambda: committed_offsets(secured.bootstrap, group, topic, PARTITIONS) == {0: 10, 1: 10}, 60,
               "all committed over TLS", 0.5)
    procs = [run.proc.pid, *run.worker_pids()]
    assert len(procs) == 3
    leaks = [f"{pid} {name}" for pid in procs for name in ("cmdline", "environ")
             if TLS_KEY_PASSWORD in _proc(pid, name)]
    assert run.stop() == 0, run.tail()
    assert {(p, o) for p, o, _ in read_record(record)} == {(p, o) for p in range(PARTITIONS) for o in range(10)}
    log = run.log_text()
    # librdkafka's security debug lines are there to look in: the key was loaded, the config dumped.
    assert "Loading private key file from" in log and "ssl.key.password = [redacted]" in log, run.tail(60)
    assert not leaks and TLS_KEY_PASSWORD not in log and TLS_KEY_PASSWORD not in run.receipt_path.read_text()


@pytest.mark.compat
@pytest.mark.parametrize(("case", "code", "needle"), [
    ("no-client-certificate", 13, "refused the TLS client certificate (ssl/tls alert bad certificate); set "
                                  "ssl.certificate.location"),
    ("broker-not-trusted", 13, "TLS handshake with the broker at 127.0.0.1:"),
    ("wrong-key-password", 78, "ssl.key.location failed: error:0A080009:SSL routines::PEM lib (check "
                               "ssl.key.password"),
])
def test_tls_refusals(ksup, secured, names, tmp_path, case, code, needle):
    topic, group = names
    create_topic(secured.bootstrap, topic, 1)
    (tmp_path / "key-pw").write_text("not-the-key-password" if case == "wrong-key-password" else TLS_KEY_PASSWORD)
    args = tls_args(secured, None if case == "no-client-certificate" else tmp_path / "key-pw",
                    trust_broker=case != "broker-not-trusted")
    t0 = time.monotonic()
    run = ksup("tests.handlers.recording:process", secured.ssl_bootstrap, topic, group,
               env={"KSUP_TEST_RECORD": str(tmp_path / "r.txt")}, extra=[*args, "--broker-timeout", "20"])
    got = run.wait(45)
    print(f"{case}: exit {got} after {time.monotonic() - t0:.2f}s")
    last = run.log_text().strip().splitlines()[-1]
    assert got == code, run.tail()
    assert needle in last, last
    assert time.monotonic() - t0 < 10, "did not wait for --broker-timeout"
    assert "not-the-key-password" not in run.log_text() and TLS_KEY_PASSWORD not in run.log_text()


def test_config_file_reference_and_env_reference_in_toml(ksup, secured, names, tmp_path):
    """The [kafka] table takes the same references as -X (a key ending in :file or :env)."""
    topic, group = names
    create_topic(secured.bootstrap, topic, 1)
    produce_sequence(secured.bootstrap, topic, 5)
    (tmp_path / "pw").write_text(PASSWORD)
    (tmp_path / "ksup.toml").write_text(
        f'[kafka]\n"security.protocol" = "SASL_PLAINTEXT"\n"sasl.mechanism" = "SCRAM-SHA-512"\n'
        f'"sasl.username:env" = "KSUP_TEST_KAFKA_USER"\n"sasl.password:file" = "{tmp_path / "pw"}"\n')
    record = tmp_path / "r.txt"
    run = ksup("tests.handlers.recording:process", secured.sasl_bootstrap, topic, group,
               env={"KSUP_TEST_RECORD": str(record), "KSUP_TEST_KAFKA_USER": USER},
               extra=["--config", str(tmp_path / "ksup.toml")])
    wait_until(lambda: len(read_record(record)) == 5, 60, "consumed")
    assert run.stop() == 0, run.tail()
    assert PASSWORD not in run.log_text()


@pytest.mark.parametrize(("args", "toml", "needle"), [
    (["-X", "sasl.password:file=/nonexistent/kafka-pw"], "",
     "sasl.password:file=/nonexistent/kafka-pw: cannot read it (No such file or directory); create the file"),
    (["-X", "sasl.password:env=KSUP_TEST_UNSET_VARIABLE"], "",
     "sasl.password:env=KSUP_TEST_UNSET_VARIABLE: the environment variable KSUP_TEST_UNSET_VARIABLE is not set"),
    (["-X", "sasl.password:file=EMPTY"], "", "is empty (write the value into it"),
    (["-X", "sasl.password:vault=x"], "", "sasl.password:vault: unknown reference :vault (a key may end in :file"),
    (["-X", "sasl.password=a", "-X", "sasl.password:env=HOME"], "", "sasl.password is given twice"),
    ([], '[kafka]\n"sasl.password" = { file = "/run/secrets/pw" }\n', '"sasl.password:file" = "/path/to/it"'),
    ([], '[kafka]\n"sasl.password:file" = "/nonexistent/kafka-pw"\n', "sasl.password:file=/nonexistent/kafka-pw"),
])
def test_bad_secret_references_are_one_line_config_errors(names, tmp_path, args, toml, needle):
    """Exit 78 before any worker starts (no broker is asked), one line naming the key and the fix."""
    topic, group = names
    (tmp_path / "EMPTY").write_text("\n")
    config = ["--config", str(tmp_path / "ksup.toml")] if toml else []
    (tmp_path / "ksup.toml").write_text(toml)
    out = subprocess.run([sys.executable, "-m", "supervisor", "start", "tests.handlers.recording:process",
                          "-b", "127.0.0.1:1", "-t", topic, "-g", group, *config, *args],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 78, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksup: error: ") and needle in lines[0], out.stderr


def test_refusals_are_classified_and_halt_with_13():
    from confluent_kafka import KafkaError

    from supervisor.child.kafka_problems import classify
    from supervisor.contract.exitcodes import ExitCode, WorkerExit
    from supervisor.parent import policy

    kafka = {"bootstrap.servers": "h:1", "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
             "sasl.username": "alice", "sasl.password": PASSWORD}
    text = ("sasl_ssl://h:1/bootstrap: SASL authentication error: Authentication failed: Invalid username or "
            "password (after 301ms in state AUTH_REQ)")
    verdict = classify(KafkaError(KafkaError._AUTHENTICATION, text), "", "g", kafka)
    assert verdict is not None and verdict.code == WorkerExit.AUTH_FAILED
    assert verdict.reason == ("authentication failed: the broker at h:1 refused the SASL PLAIN login of user 'alice' "
                              "(Authentication failed: Invalid username or password); check sasl.username and the "
                              "password (sasl.password, or the file or variable its :file/:env reference names)")
    assert classify(KafkaError(KafkaError._TRANSPORT), "", "g", kafka) is None
    untrusted = ("ssl://h:1/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: "
                 "broker certificate could not be verified, verify that ssl.ca.location is correctly configured or "
                 "root CA certificates are installed (install ca-certificates package) "
                 "(after 25ms in state SSL_HANDSHAKE)")
    rejected = ("ssl://h:1/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls alert bad certificate: "
                "SSL alert number 42 (after 3ms in state APIVERSION_QUERY)")
    for code, text, needle in ((KafkaError._SSL, untrusted, "set ssl.ca.location"),
                               (KafkaError._TRANSPORT, rejected, "refused the TLS client certificate")):
        verdict = classify(KafkaError(code, text), "", "g", kafka)
        assert verdict is not None and verdict.code == WorkerExit.AUTH_FAILED and needle in verdict.reason, verdict
    refused_by_peer = "ssl://h:1/bootstrap: Disconnected: connection closed by peer (after 1ms in state UP)"
    assert classify(KafkaError(KafkaError._TRANSPORT, refused_by_peer), "", "g", kafka) is None
    assert policy.halt_code_for_boot_failure(WorkerExit.AUTH_FAILED) == ExitCode.AUTH_FAILED
    assert policy.halt_for_worker_exit(13, 0, "why", "", "g") == (ExitCode.AUTH_FAILED, "why")


def test_references_resolve(tmp_path):
    from supervisor import references

    (tmp_path / "pw").write_text("s3cret\n\n")  # one trailing newline is dropped, not more
    out, variables = references.resolve({"sasl.password:file": str(tmp_path / "pw"), "sasl.username:env": "U",
                                          "group.id": "g"}, {"U": "alice"})
    assert out == {"sasl.password": "s3cret\n", "sasl.username": "alice", "group.id": "g"}
    assert variables == ["U"]


def test_docs_list_exit_13_and_the_units_do_not_restart_on_it():
    """The README's exit-code table has a row for every ExitCode; the systemd units, like for 8,
    do not restart on 13 (a restart would be refused again)."""
    import re

    from supervisor.contract.exitcodes import ExitCode

    readme = (REPO / "README.md").read_text()
    missing = [c.name for c in ExitCode if f"| {int(c)} | {c.name} |" not in readme]
    assert missing == [], f"exit codes without a README row: {missing}"
    for unit in ("ksup.service", "ksup@.service"):
        text = (REPO / "systemd" / unit).read_text()
        prevented = set(re.search(r"^RestartPreventExitStatus=(.*)$", text, re.M).group(1).split())
        assert {"8", "13"} <= prevented, (unit, prevented)
