"""The relay's settings: every flag of ``printrelay serve``, its default, and its limit.

One place for each limit and default (STYLE.md); flags, ``PRINTRELAY_*`` variables and the TOML file are
derived from these fields by :mod:`service.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.settings import format_duration, option, parse_duration, parse_hostport, parse_size

GiB = 1024**3
MAX_HELD_JOB_TTL = 365 * 86400.0  # a year: a longer wait for a release is a typo, not a policy


@dataclass(frozen=True)
class RelayConfig:
    listen: tuple[str, int] = option(
        ("127.0.0.1", 8080), "public HTTP API and IPP endpoint, HOST:PORT", parse=parse_hostport,
        metavar="HOST:PORT",
    )  # fmt: skip
    tunnel_listen: tuple[str, int] = option(
        ("127.0.0.1", 8081), "WebSocket listener for connectors, HOST:PORT", parse=parse_hostport,
        metavar="HOST:PORT",
    )  # fmt: skip
    data_dir: Path = option(Path("printrelay-data"), "SQLite database and spool", parse=Path, metavar="DIR")
    database_url: str = option(
        "", "PostgreSQL for relay replicas sharing one database, postgresql://USER[:PASSWORD]@HOST:PORT/DB "
        "(default: SQLite in --data-dir, for one relay process)", secret=True, metavar="URL",
    )  # fmt: skip
    public_url: str = option("", "URL clients use to reach --listen (for IPP printer-uri and links)")
    max_job_bytes: int = option(1 * GiB, "largest document accepted (413 above)", parse=parse_size)
    job_ttl: float = option(14 * 86400.0, "undelivered jobs expire after this long", parse=parse_duration)
    held_job_ttl: float = option(
        86400.0, "jobs held for release (pull printers, hold=true) that nobody releases expire after this "
        "long, and their documents are erased; a released job has --job-ttl again", parse=parse_duration,
    )  # fmt: skip
    max_attempts: int = option(5, "delivery attempts before a job fails")
    retry_base: float = option(
        2.0, "first retry delay; doubles per attempt, with jitter", parse=parse_duration
    )
    retry_cap: float = option(300.0, "longest retry delay", parse=parse_duration)
    tenant_max_spool_bytes: int = option(
        50 * GiB,
        "quota: a tenant's undelivered documents may take this much spool (507 above)",
        parse=parse_size,
    )
    tenant_max_jobs: int = option(100_000, "quota: a tenant's undelivered jobs (429 above)")
    max_child_tenants: int = option(
        1000, "child tenants one tenant may create over the integrator API (POST /v1/tenants; 409 above): a "
        "runaway script of an integrator stops there, not at the database's size",
    )  # fmt: skip
    max_streams_per_connector: int = option(32, "jobs streamed to one connector session at once")
    job_lease: float = option(
        15.0, "a claim on a job in flight lasts this long unless renewed (every third of it while the job "
        "streams); a job whose claim lapses is queued again", parse=parse_duration,
    )  # fmt: skip
    tls_cert: Path | None = option(
        None, "PEM certificate chain: serve HTTPS and WSS (reloaded on SIGHUP); unset behind a TLS ingress",
        parse=Path, metavar="FILE",
    )  # fmt: skip
    tls_key: Path | None = option(None, "PEM private key of --tls-cert", parse=Path, metavar="FILE")
    rate_limit: float = option(50.0, "API requests per second per token, on average (0: no limit)")
    rate_burst: int = option(100, "API requests a token may make at once before --rate-limit applies")
    webhook_allow_private: bool = option(
        False,
        "let webhooks reach loopback, private and link-local addresses (off: no probing the relay's network)",
    )
    fetch_allow_private: bool = option(
        False,
        "let print-from-URL (source_url, IPP Print-URI/Send-URI) fetch from loopback, private and link-local "
        "addresses (off: no probing the relay's network; on for a relay inside the network it fetches from)",
    )
    fetch_timeout: float = option(
        300.0, "a print-from-URL fetch, first connection to last byte, may take this long (504 above)",
        parse=parse_duration,
    )  # fmt: skip
    secret_key_file: Path | None = option(
        None, "key that seals webhook signing secrets in the database, so a copy of the database alone "
        "reveals none (default DATA_DIR/secret.key, created at first start; relays sharing a database "
        "share it)", parse=Path, metavar="FILE",
    )  # fmt: skip
    webhook_max_attempts: int = option(10, "webhook delivery attempts before a change is dropped (logged)")
    webhook_retry_base: float = option(
        300.0, "first webhook retry delay; doubles per attempt up to 6 h, with jitter (10 attempts: ~1 day)",
        parse=parse_duration,
    )  # fmt: skip
    connector_offline_grace: float = option(
        30.0, "a connector without a session this long is announced offline (connector.offline); one that "
        "comes back sooner announces nothing", parse=parse_duration,
    )  # fmt: skip
    metrics_listen: tuple[str, int] | None = option(
        None, "serve /metrics, /healthz and /readyz on this HOST:PORT (off when unset)", parse=parse_hostport,
        metavar="HOST:PORT",
    )  # fmt: skip
    metrics_per_printer: bool = option(
        False, "label job metrics with printer ids (one series per printer: mind the cardinality)"
    )
    drain_grace: float = option(
        20.0, "on SIGTERM, how long job streams in flight may take to finish", parse=parse_duration
    )
    portal_session_ttl: float = option(
        12 * 3600.0, "a sign-in to the portal (/portal) lasts this long; then the person signs in again",
        parse=parse_duration,
    )  # fmt: skip
    portal_max_upload_bytes: int = option(
        100 * 1024**2, "largest file printed from the portal's page (413 above; never above max_job_bytes)",
        parse=parse_size,
    )  # fmt: skip
    log_level: str = option("info", "debug, info, warning or error")
    log_format: str = option("auto", "json, text, or auto (text on a terminal, else json)")

    def __post_init__(self) -> None:
        if self.max_job_bytes <= 0:
            raise ValueError("max_job_bytes must be positive")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_child_tenants < 0:
            raise ValueError("max_child_tenants must be 0 (no child tenants) or more")
        if self.max_streams_per_connector < 1:
            raise ValueError("max_streams_per_connector must be at least 1")
        if not 1.0 <= self.held_job_ttl <= MAX_HELD_JOB_TTL:
            raise ValueError(
                f"held_job_ttl must be between 1s and {format_duration(MAX_HELD_JOB_TTL)}, "
                f"not {format_duration(self.held_job_ttl)}"
            )
        if not 1.0 <= self.job_lease <= 3600.0:
            raise ValueError(f"job_lease must be between 1 s and 1 h, not {self.job_lease:g} s")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ValueError("rate_limit must be >= 0 and rate_burst at least 1")
        if self.webhook_max_attempts < 1 or self.webhook_retry_base <= 0:
            raise ValueError("webhook_max_attempts must be at least 1 and webhook_retry_base positive")
        if not 0.1 <= self.connector_offline_grace <= 3600.0:
            grace = self.connector_offline_grace
            raise ValueError(f"connector_offline_grace must be between 0.1 s and 1 h, not {grace:g} s")
        if not 60.0 <= self.portal_session_ttl <= 30 * 86400.0:
            raise ValueError(
                f"portal_session_ttl must be between 1 min and 30 days, not {self.portal_session_ttl:g} s"
            )
        if self.portal_max_upload_bytes <= 0:
            raise ValueError("portal_max_upload_bytes must be positive")
        if self.log_format not in {"json", "text", "auto"}:
            raise ValueError(f"log_format must be json, text or auto, not {self.log_format!r}")

    @property
    def database_path(self) -> Path:
        return self.data_dir / "relay.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"
