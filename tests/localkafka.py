"""A real single-node Apache Kafka (KRaft) broker on 127.0.0.1, for tests, the demo and benchmarks.

The broker's jars come from Maven Central (resolved with `mvn`, cached under
``~/.cache/ksup/kafka-<version>``); the broker runs with plain ``java`` on free loopback
ports, in its own session so that it can be stopped by pid even when a test fails.

Run as a script to keep a broker in the foreground::

    python tests/localkafka.py run        # prints the bootstrap address, Ctrl+C stops it
"""

from __future__ import annotations

import base64
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KAFKA_VERSION = os.environ.get("KSUP_KAFKA_VERSION", "4.3.1")
CACHE_ROOT = Path(os.environ.get("KSUP_CACHE_DIR", Path.home() / ".cache" / "ksup"))
# Pinned: Maven 3.8's default dependency plugin is too old for copy-dependencies with includeScope.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.ksup</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>{artifact}</artifactId>
      <version>{version}</version></dependency>
    <!-- Kafka 3.9/4.x use slf4j-api 1.7.x; without a binding the broker logs nothing to wait on. -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId>
      <version>1.7.36</version></dependency>
  </dependencies>
</project>
"""

JVM_OPTS = [
    "-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError", "-Djava.net.preferIPv4Stack=true",
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
    "-Dorg.slf4j.simpleLogger.showDateTime=true", "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
]


def ensure_jars(version: str = KAFKA_VERSION, artifact: str = "kafka_2.13") -> Path:
    """Return the folder holding the runtime classpath of ``artifact`` (default: the broker),
    downloading it once. ``kafka-tools`` holds the command-line tools (kafka-consumer-groups),
    which the broker's classpath lacks."""
    name = "kafka" if artifact == "kafka_2.13" else artifact
    libs = CACHE_ROOT / f"{name}-{version}" / "libs"
    if (libs / ".complete").exists():
        return libs
    if shutil.which("mvn") is None:
        raise RuntimeError("mvn not found: install Maven (apt-get install maven) to fetch the Kafka jars")
    libs.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ksup-mvn-", dir=libs.parent))
    try:
        (work / "pom.xml").write_text(_POM.format(version=version, artifact=artifact))
        out = work / "libs"
        subprocess.run(
            ["mvn", "-q", "-B", f"{DEPENDENCY_PLUGIN}:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={out}"],
            cwd=work, check=True, timeout=900,
        )
        (out / ".complete").write_text(version)
        if libs.exists():
            shutil.rmtree(libs)
        out.rename(libs)  # atomic within one filesystem: a half-download is never seen as complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    # Like Kafka's Uuid.randomUuid(): never starting with "-", which the tool would read as a flag.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def node_properties(node_id: int, port: int, controller_port: int, voters: str, data_dir: Path,
                    replicas: int = 1) -> dict[str, str]:
    """server.properties of one combined broker+controller node on 127.0.0.1. ``replicas`` > 1
    (a cluster): internal topics and new topics get that replication factor and need
    ``replicas - 1`` in sync (min.insync.replicas), so one node may be down."""
    min_isr = str(max(replicas - 1, 1))
    return {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        "offsets.topic.replication.factor": str(replicas),
        "offsets.topic.num.partitions": "1" if replicas == 1 else "3",  # the default 50 makes the first join slow
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": "0",  # the default adds 3 s to every first join
        "group.min.session.timeout.ms": "1000",  # lets tests use short session timeouts
        "group.consumer.min.session.timeout.ms": "1000",
        "group.consumer.session.timeout.ms": "10000",
        "group.consumer.min.heartbeat.interval.ms": "500",
        "group.consumer.heartbeat.interval.ms": "1000",
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "log.cleaner.dedupe.buffer.size": "2097152",  # the default 128 MiB comes out of the heap
        "num.network.threads": "2",
        "num.io.threads": "2",
        **({} if replicas == 1 else {
            "default.replication.factor": str(replicas),
            "min.insync.replicas": min_isr,
            # A killed node is fenced by the controller after 3 s instead of 9 s, so its
            # partitions (and the groups it coordinates) move within seconds.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
        }),
    }


def write_properties(workdir: Path, props: dict[str, str]) -> Path:
    path = workdir / "server.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


@dataclass(frozen=True)
class Secured:
    """Extra listeners of a secured broker, next to its PLAINTEXT one (which the tests' own admin
    and producer keep using): SASL_PLAINTEXT with PLAIN and SCRAM-SHA-512 for ``users`` (name ->
    password: PLAIN users in the listener's JAAS config, SCRAM credentials written into the
    metadata log at format time); ``reauth_ms`` > 0 makes the broker demand re-authentication
    (KIP-368) that often on SASL connections."""

    users: dict[str, str] = field(default_factory=dict)
    reauth_ms: int = 0
    # An SSL listener too, requiring a client certificate: a CA, the broker's certificate and a
    # client certificate whose key is encrypted with this password are made with openssl in
    # <workdir>/tls (ca.pem, client.pem, client.key).
    tls_key_password: str = ""


class LocalKafka:
    """One broker+controller node. ``start()`` blocks until the broker serves requests."""

    def __init__(self, workdir: Path | None = None, version: str = KAFKA_VERSION,
                 secured: Secured | None = None) -> None:
        self.version = version
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ksup-kafka-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.controller_port = free_port()
        self.secured = secured
        self.sasl_port = free_port() if secured is not None else 0
        self.ssl_port = free_port() if secured is not None and secured.tls_key_password else 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_PLAINTEXT listener (PLAIN and SCRAM-SHA-512); only with ``secured``."""
        assert self.secured is not None, "not a secured broker"
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        """The SSL listener (client certificate required); only with ``secured.tls_key_password``."""
        assert self.ssl_port, "no TLS listener"
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "tls"

    def _make_certificates(self, key_password: str) -> None:
        """A throwaway CA; the broker's certificate for IP 127.0.0.1 (key unencrypted, PKCS#8, as
        Kafka's PEM keystore wants it); a client certificate with an encrypted key."""
        d = self.tls_dir
        d.mkdir(exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
                "-days", "2", "-subj", "/CN=ksup-test-ca")
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
                "-subj", "/CN=127.0.0.1")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
        openssl("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server.pk8")
        (d / "server-keystore.pem").write_text((d / "server.pk8").read_text() + (d / "server.pem").read_text())
        openssl("req", "-newkey", "rsa:2048", "-keyout", "client.key", "-passout", f"pass:{key_password}",
                "-out", "client.csr", "-subj", "/CN=ksup-client")
        openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "client.pem", "-days", "2")

    def _listener_properties(self) -> dict[str, str]:
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"]
        extra: dict[str, str] = {}
        if self.secured is not None:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            protocols.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
            users = " ".join(f'user_{name}="{pw}"' for name, pw in self.secured.users.items())
            prefix = "listener.name.sasl_plaintext."
            extra = {
                f"{prefix}sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-512",
                f"{prefix}plain.sasl.jaas.config":
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
                f"{prefix}scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            }
            if self.secured.reauth_ms:
                extra[f"{prefix}connections.max.reauth.ms"] = str(self.secured.reauth_ms)
        if self.ssl_port:
            listeners.append(f"SSL://127.0.0.1:{self.ssl_port}")
            protocols.append("SSL:SSL")
            tls = "listener.name.ssl."
            extra.update({
                f"{tls}ssl.keystore.type": "PEM",
                f"{tls}ssl.keystore.location": str(self.tls_dir / "server-keystore.pem"),
                f"{tls}ssl.truststore.type": "PEM",
                f"{tls}ssl.truststore.location": str(self.tls_dir / "ca.pem"),
                f"{tls}ssl.client.auth": "required",
            })
        return {
            "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{self.controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "listener.security.protocol.map": ",".join(protocols),
            **extra,
        }

    def _format_args(self) -> list[str]:
        if self.secured is None:
            return []
        return [a for name, pw in self.secured.users.items()
                for a in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={pw}]")]

    def _write_properties(self) -> Path:
        props = node_properties(1, self.port, self.controller_port, f"1@127.0.0.1:{self.controller_port}",
                                self.workdir / "data")
        return write_properties(self.workdir, {**props, **self._listener_properties()})

    def start(self, timeout: float = 90.0) -> None:
        libs = ensure_jars(self.version)
        t0 = time.monotonic()
        if self.ssl_port and self.secured is not None:
            self._make_certificates(self.secured.tls_key_password)
        props = self._write_properties()
        subprocess.run(
            ["java", "-Xmx256m", "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
             "-t", _cluster_id(), "-c", str(props), "--ignore-formatted", *self._format_args()],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        )
        self.proc = _launch(self.workdir, libs)
        try:
            _wait_started(self.workdir, self.proc.pid, timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def rss_bytes(self) -> int:
        if self.proc is None:
            return 0
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            except ProcessLookupError:
                pass
        # A restart (``restart_in``) may have replaced our process with one we did not start.
        pid_file = self.workdir / "broker.pid"
        if pid_file.exists() and (proc is None or int(pid_file.read_text()) != proc.pid):
            _stop_pid(int(pid_file.read_text()), timeout)
        pid_file.unlink(missing_ok=True)  # stopped: never signal that pid again

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: between fork and exec nothing may import


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process (thread) that started it dies."""
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)


def _launch(workdir: Path, libs: Path, die_with_parent: bool = False) -> subprocess.Popen[bytes]:
    """Start the broker of ``workdir`` (formatted already); its pid goes to broker.pid. With
    ``die_with_parent`` the kernel kills it if the calling thread's process dies (even by
    SIGKILL or an abort), so a crashed test run leaves no broker behind; call it from the
    main thread then (the signal follows the thread that started it)."""
    log_path = workdir / "broker.log"
    if log_path.exists():
        log_path.replace(workdir / f"broker-{time.monotonic_ns()}.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        ["java", *JVM_OPTS, "-cp", f"{libs}/*", "kafka.Kafka", str(workdir / "server.properties")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # stop it as a group by pid, never by name
        preexec_fn=_die_with_parent if die_with_parent else None,
    )
    log.close()
    (workdir / "broker.pid").write_text(str(proc.pid))
    return proc


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for us
    except (OSError, IndexError):
        return False


def _wait_started(workdir: Path, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    log_path = workdir / "broker.log"
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise RuntimeError(f"Kafka exited; see {log_path}")
        if b"Kafka Server started" in log_path.read_bytes():
            return
        time.sleep(0.1)
    raise TimeoutError(f"Kafka did not start within {timeout:.0f}s; see {log_path}")


def _stop_pid(pid: int, timeout: float = 20.0) -> None:
    """Stop a broker we may not be the parent of: SIGTERM its group, SIGKILL at the deadline."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            return


def restart_in(workdir: Path, timeout: float = 90.0) -> float:
    """Restart the broker of ``workdir`` (a clean shutdown, then the same node on the same ports
    and data); returns once it serves again, with how long it was away."""
    t0 = time.monotonic()
    _stop_pid(int((workdir / "broker.pid").read_text()))
    proc = _launch(workdir, ensure_jars())
    _wait_started(workdir, proc.pid, timeout)
    return time.monotonic() - t0


def main(argv: list[str]) -> int:
    if argv[:1] == ["fetch"] and len(argv) <= 3:  # fetch [VERSION [ARTIFACT]]
        t0 = time.monotonic()
        print(ensure_jars(*argv[1:]), f"({time.monotonic() - t0:.1f}s)")
        return 0
    if argv[:1] == ["restart"] and len(argv) == 2:
        print(f"restarted in {restart_in(Path(argv[1])):.1f}s")
        return 0
    if argv[:1] != ["run"]:
        print("usage: localkafka.py fetch [VERSION [ARTIFACT]] | run | restart WORKDIR", file=sys.stderr)
        return 2
    broker = LocalKafka()

    def started() -> str:
        return f"started in {broker.start_seconds:.1f}s, rss {broker.rss_bytes() >> 20} MiB"

    return serve_until_signal(broker, started, lambda: broker.proc is not None and broker.proc.poll() is None)


def serve_until_signal(kafka: Any, started: Callable[[], str], running: Callable[[], bool]) -> int:
    """``run`` of localkafka.py and localcluster.py: start ``kafka`` (its ``start()``), print its
    bootstrap on stdout and ``started()`` on stderr, serve until SIGTERM/SIGINT or until
    ``running()`` is false, then ``cleanup()`` (also on a failed start)."""
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        kafka.start()
        print(kafka.bootstrap, flush=True)
        print(started(), file=sys.stderr, flush=True)
        while not stop and running():
            time.sleep(0.2)  # waits for a signal (the handler only records it)
    finally:
        kafka.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
