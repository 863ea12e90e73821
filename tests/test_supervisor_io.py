"""The supervisor's I/O edges (issue 13 findings 5, 8; issue 12 logs and secrets): signals are
never lost, worker output is bounded and linear, a stderr nobody reads never stalls the loop,
worker stdout is routed like stderr (redacted, JSON lines), tracebacks survive redaction."""

from __future__ import annotations

import sys
import threading

from supervisor.parent.signals import SignalQueue


def test_no_signal_is_lost_while_the_loop_takes_them():
    """Finding 5: the pending list was read and cleared in two steps; a signal recorded in
    between was lost. Signal handlers run between bytecodes of the main thread; a thread
    calling the recorder under a tiny switch interval interleaves the same way."""
    q = SignalQueue()
    total, got = 200_000, []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def fire() -> None:
            for _ in range(total):
                q._record(15, None)

        t = threading.Thread(target=fire)
        t.start()
        while t.is_alive():
            got += q.take()
        t.join()
        got += q.take()
    finally:
        sys.setswitchinterval(old)
        q.uninstall()
    assert len(got) == total, f"{total - len(got)} signals lost"


def _log_lines(fmt: str, kafka: dict[str, str], emit) -> str:  # type: ignore[no-untyped-def]
    import io
    import logging

    from supervisor.logs import secret_values, setup_logging

    buf, old = io.StringIO(), sys.stderr
    sys.stderr = buf
    try:
        setup_logging(fmt, "info", "supervisor", secrets=secret_values(kafka))
        emit(logging.getLogger("ksup.test"))
    finally:
        sys.stderr = old
        logging.getLogger().handlers[:] = []
    return buf.getvalue()


def test_text_logs_keep_tracebacks_when_a_secret_is_configured():
    def emit(log):  # type: ignore[no-untyped-def]
        try:
            raise ValueError("boom with hunter2-secret inside")
        except ValueError:
            log.exception("handler failed")

    out = _log_lines("text", {"sasl.password": "hunter2-secret"}, emit)
    assert "Traceback (most recent call last)" in out and "ValueError: boom with *** inside" in out, out
    assert "hunter2-secret" not in out


def test_every_secret_property_is_redacted_whatever_its_length():
    pem = "-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-----END PRIVATE KEY-----"
    kafka = {"ssl.key.pem": pem, "sasl.password": "xy7", "ssl.key.password": "k9",
             "sasl.oauthbearer.client.secret": "s3cr", "ssl.keystore.password": "pw1"}

    def emit(log):  # type: ignore[no-untyped-def]
        log.info("config: ssl.key.pem=%s sasl.password=xy7 ssl.key.password=k9 keystore pw1 client s3cr", pem)
        log.info("the word xy7 alone and a token k9, but xy70 and k99 are other words")

    for fmt in ("json", "text"):
        out = _log_lines(fmt, kafka, emit)
        for secret in ("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", " xy7 ", "=xy7 ", " k9,", "=k9 ", "pw1", "s3cr"):
            assert secret not in out, (fmt, secret, out)
        assert "xy70" in out and "k99" in out, "short secrets are redacted as whole words only"
