"""`batchtag run --cluster` end to end: real Dask clusters (a LocalCluster, and a scheduler
and workers started with the `dask` CLI), real `batchtag run` subprocesses, real signals."""

from __future__ import annotations

import http.server
import json
import signal
import sys
import threading
from pathlib import Path

import pytest

from batchtag import codes
from batchtag.cluster import ClusterError, parse_cluster_address
from batchtag.cluster.driver import run_on_cluster, shipped_config, tagger_on_every_worker
from batchtag.cluster.worker import ChunkResult
from batchtag.config import ConfigError, RunConfig, build_config
from batchtag.pipeline.progress import Progress
from batchtag.pipeline.sink import open_sink
from batchtag.records import Record
from tests.support import (
    Proc,
    Spawner,
    assert_refused,
    free_port,
    line_count,
    read_out,
    run_cli,
    run_flags,
    server_stats,
    tiny_jpegs,
    wait_until,
    write_credentials,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "photos"
DASK = str(Path(sys.executable).parent / "dask")


class Certificates:
    """A throwaway CA and one certificate a party (scheduler, workers, the driver), each
    for 127.0.0.1 and good for client and server use, as PEM files in ``folder``."""

    def __init__(self, folder: Path, parties: list[str]) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        folder.mkdir(parents=True)
        self.folder = folder
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = self._certificate("batchtag test CA", ca_key, ca_key, None, is_ca=True)
        self.ca = str(self._write("ca.pem", ca_cert))
        for party in parties:
            key = ec.generate_private_key(ec.SECP256R1())
            self._write(f"{party}.pem", self._certificate(party, key, ca_key, ca_cert, is_ca=False))
            self._write(f"{party}.key", key)

    @staticmethod
    def _certificate(name: str, key, signer, issuer, is_ca: bool):
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )
        if not is_ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    def _write(self, name: str, thing) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.folder / name
        if hasattr(thing, "public_bytes"):
            path.write_bytes(thing.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(
                thing.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            path.chmod(0o600)
        return path

    def cert(self, party: str) -> str:
        return str(self.folder / f"{party}.pem")

    def key(self, party: str) -> str:
        return str(self.folder / f"{party}.key")

    def dask_args(self, party: str) -> list[str]:
        protocol = ["--protocol", "tls"] if party == "scheduler" else []
        return [
            *protocol,
            "--tls-ca-file",
            self.ca,
            "--tls-cert",
            self.cert(party),
            "--tls-key",
            self.key(party),
        ]

    def security(self, party: str):
        from distributed.security import Security

        return Security(
            tls_ca_file=self.ca,
            tls_client_cert=self.cert(party),
            tls_client_key=self.key(party),
            require_encryption=True,
        )


def start_dask(
    spawner: Spawner, tmp_path: Path, workers: list[str], tls: Certificates | None = None
) -> tuple[str, dict[str, Proc]]:
    """A `dask scheduler` and `dask worker`s as separate processes on loopback, no
    dashboards; returns the scheduler address once every worker has joined. With ``tls``
    they speak TLS and ask every peer for a certificate signed by its CA."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = spawn_dask(
        spawner,
        "scheduler",
        *(tls.dask_args("scheduler") if tls else []),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-dashboard",
        "--dashboard-address",  # its plain HTTP server (health checks) still listens
        "127.0.0.1:0",
        "--scheduler-file",
        scheduler_file,
    )
    wait_until(scheduler_file.exists, 90, "the scheduler file", alive=scheduler)
    wait_until(lambda: "address" in scheduler_file.read_text(), 90, "the scheduler address", alive=scheduler)
    address = json.loads(scheduler_file.read_text())["address"]
    started = {}
    for name in workers:
        started[name] = spawn_dask(
            spawner,
            "worker",
            address,
            *(tls.dask_args(name) if tls else []),
            "--host",
            "127.0.0.1",
            "--no-nanny",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--dashboard-address",
            "127.0.0.1:0",
            "--name",
            name,
            "--local-directory",
            tmp_path / f"dask-{name}",
        )
    from distributed import Client

    with Client(address, timeout=60, security=tls.security("driver") if tls else None) as client:
        client.wait_for_workers(len(workers), timeout=120)
    return address, started


def spawn_dask(spawner: Spawner, *args) -> Proc:
    return spawner.start_program([DASK, *args], name=f"dask-{args[0]}")


# --- settings ------------------------------------------------------------------------------------


def test_cluster_addresses_are_checked_before_anything_starts():
    assert parse_cluster_address("local:3").local_workers == 3
    assert parse_cluster_address("tcp://10.0.0.5:8786").scheduler == "tcp://10.0.0.5:8786"
    for bad in ("local:0", "local:x", "10.0.0.5:8786", "tcp://host", "http://host:8786"):
        with pytest.raises(ClusterError):
            parse_cluster_address(bad)
    with pytest.raises(ConfigError, match="local:N"):
        build_config({"sources": ["a"], "out": "o.jsonl", "cluster": "local:none"})


def test_cluster_comes_from_flag_environment_or_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('cluster = "local:4"\n')
    base = {"sources": ["a"], "out": "o.jsonl"}
    assert build_config(base, str(toml)).cluster == "local:4"
    env = {"BATCHTAG_CLUSTER": "tcp://127.0.0.1:8786"}
    assert build_config(base, str(toml), environ=env).cluster == "tcp://127.0.0.1:8786"
    assert build_config({**base, "cluster": "local:2"}, str(toml), environ=env).cluster == "local:2"


def test_unreachable_scheduler_is_one_line_and_exit_2(tmp_path):
    """Nothing listening: stopped by --cluster-connect-timeout (before: Dask's 30 s)."""
    result = run_cli(
        "run",
        EXAMPLES,
        "-o",
        tmp_path / "out.jsonl",
        "--cluster",
        f"tcp://127.0.0.1:{free_port()}",
        "--cluster-connect-timeout",
        "1",
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "600s"},  # ours bounds it, not Dask's
    )
    assert_refused(result, "cannot reach the Dask scheduler at tcp://127.0.0.1:")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture
def http_port():
    """A plain HTTP server on loopback: a port that answers, but not as Dask does."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_port_that_speaks_http_is_one_line_and_exit_2(tmp_path, http_port):
    """Before: no output, a hang with no end (Dask's connect timeout does not cover the
    first reply). The run's timeout bounds the whole handshake; the subprocess timeout
    here only guards against the old hang."""
    result = run_cli(
        "run",
        EXAMPLES,
        "-o",
        tmp_path / "out.jsonl",
        "--tagger",
        "color",
        "--cluster",
        f"tcp://127.0.0.1:{http_port}",
        "--cluster-connect-timeout",
        "2",
        timeout=180,
    )
    assert_refused(
        result, f"tcp://127.0.0.1:{http_port}", "no handshake within 2 s", "--cluster-connect-timeout"
    )


def test_the_connect_timeout_and_tls_settings_are_checked_and_documented(tmp_path):
    help_text = " ".join(run_cli("run", "--help").stdout.split())
    assert "handshake before the run stops with exit 2 (default 10)" in help_text
    base = {"sources": ["a"], "out": "o.jsonl"}
    with pytest.raises(ConfigError, match="--cluster-connect-timeout must be positive"):
        build_config({**base, "cluster": "tcp://h:1", "cluster_connect_timeout": 0.0})
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="need a tls:// scheduler"):
        build_config({**base, "cluster": "tcp://h:1", "cluster_tls_ca": str(ca)})
    with pytest.raises(ConfigError, match="needs both --cluster-tls-ca and --cluster-tls-cert"):
        build_config({**base, "cluster": "tls://h:1", "cluster_tls_ca": str(ca)})
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'cluster = "tls://h:1"\ncluster-tls-ca = "{ca}"\ncluster-tls-cert = "{ca}"\ncluster-connect-timeout = 3\n'
    )
    config = build_config(base, str(toml))
    assert (
        config.cluster_tls_ca == config.cluster_tls_cert == str(ca) and config.cluster_connect_timeout == 3.0
    )


class CapturingClient:
    """Stands in for the Dask client: keeps the plugin as Dask would send it (pickled)."""

    def __init__(self) -> None:
        self.shipped: list[bytes] = []

    async def register_plugin(self, plugin, name):
        from distributed.protocol.pickle import dumps

        self.shipped.append(dumps(plugin))

    async def unregister_worker_plugin(self, name):
        pass


@pytest.mark.parametrize("endpoint", ["local", "https://api.example.com"])
async def test_the_secret_key_goes_to_the_scheduler_only_when_the_endpoint_needs_it(endpoint):
    """What the scheduler holds, any of its clients can read: with the embedded endpoint
    the workers get no credentials at all; a remote endpoint needs them (README)."""
    secret = "s3cr3t-KEY-0123456789abcdef"
    config = RunConfig(
        sources=["a"], out="o.jsonl", endpoint=endpoint, appid="1250000000", secret_id="AKID-ours",
        secret_key=secret, cluster="tcp://127.0.0.1:8786",
    )  # fmt: skip
    client = CapturingClient()
    async with tagger_on_every_worker(client, shipped_config(config), "run1", 1):
        pass
    (shipped,) = client.shipped
    needed = endpoint != "local"
    assert (secret.encode() in shipped) is needed
    assert (b"AKID-ours" in shipped) is needed
    assert config.secret_key == secret  # the driver's own settings are untouched


def test_a_tls_scheduler_with_client_certificates_runs_and_refuses_a_client_without(spawner, tmp_path):
    """`dask scheduler` and `dask worker` with TLS on loopback, certificates made here:
    the run with the client certificate tags everything; without one, or over tcp://,
    the scheduler refuses it: one line, exit 2."""
    tls = Certificates(tmp_path / "certs", ["scheduler", "w1", "driver"])
    address, _ = start_dask(spawner, tmp_path, ["w1"], tls=tls)
    assert address.startswith("tls://127.0.0.1:")
    paths = tiny_jpegs(tmp_path / "photos", 12)
    out = tmp_path / "out.jsonl"
    result = run_cli(
        "run", tmp_path / "photos", "-o", out, "--tagger", "color", "--no-progress", "--cluster", address,
        "--cluster-tls-ca", tls.ca, "--cluster-tls-cert", tls.cert("driver"), "--cluster-tls-key", tls.key("driver"),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(read_out(out).keys) == paths
    assert all(r["status"] == "ok" for r in read_out(out).records)
    stranger = tmp_path / "stranger.jsonl"
    stranger_cert = Certificates(tmp_path / "other-ca", ["driver"])  # a CA the scheduler does not trust
    for extra in (
        ["--cluster", address],  # no certificate
        ["--cluster", address.replace("tls", "tcp")],  # no TLS
        ["--cluster", address, "--cluster-tls-ca", tls.ca, "--cluster-tls-cert", stranger_cert.cert("driver"),
         "--cluster-tls-key", stranger_cert.key("driver")],
    ):  # fmt: skip
        refused = run_cli(
            "run", tmp_path / "photos", "-o", stranger, "--tagger", "color", *extra,
            "--cluster-connect-timeout", "3", timeout=180,
        )  # fmt: skip
        assert_refused(refused, "cannot reach the Dask scheduler")
        assert not stranger.exists()


# --- end to end ------------------------------------------------------------------------------------


def test_local_cluster_with_the_embedded_model_matches_a_plain_run(tmp_path):
    """local:2, the real model loaded in each worker process: the same records as a plain
    run (same format, same tags, the same error record for a file no worker can read),
    per-worker counts in the summary. (Resume under --cluster: the Ctrl-C test.)"""
    manifest = tmp_path / "more.txt"
    manifest.write_text(f"{tmp_path / 'not-there.jpg'}\n")
    plain, clustered = tmp_path / "plain.jsonl", tmp_path / "cluster.jsonl"
    summary_json = tmp_path / "summary.json"
    sources = [EXAMPLES, manifest]
    assert run_cli("run", *sources, "-o", plain, "--lang", "en").returncode == 1
    result = run_cli(
        "run",
        *sources,
        "-o",
        clustered,
        "--lang",
        "en",
        "--cluster",
        "local:2",
        "--summary-json",
        summary_json,
    )
    assert result.returncode == 1, result.stderr
    assert "no items found" not in result.stderr  # the workers' chunk runs do not warn (issue 19)
    expected = read_out(plain).by_key()
    got = read_out(clustered).by_key()
    assert sorted(got) == sorted(expected) and len(got) >= 8
    for key, record in got.items():
        assert record["tags"] or record["status"] == "error", key
        for varies in ("elapsed_ms", "made", "run"):  # when, and by which run
            record.pop(varies, None), expected[key].pop(varies, None)
        assert record == expected[key]
    missing = got[str(tmp_path / "not-there.jpg")]
    assert missing["status"] == "error" and missing["message"] == "file not found"
    summary = json.loads(summary_json.read_text())
    assert summary["ok"] == len(got) - 1 and sum(summary["workers"].values()) == len(got)


def test_dask_cli_cluster_loses_a_worker_mid_run_and_every_key_is_written_once(spawner, tmp_path):
    """A scheduler and two workers from the `dask` CLI; one worker is SIGKILLed once
    records have started to arrive. Its chunks are rerun elsewhere: exit 0, every key
    exactly once, every item ok."""
    keys = tiny_jpegs(tmp_path / "photos", 320)
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"), "--inject-latency-ms", "20")
    address, workers = start_dask(spawner, tmp_path, ["w1", "w2"])
    out, summary_json = tmp_path / "out.jsonl", tmp_path / "summary.json"
    run = spawner.start(
        "run",
        tmp_path / "photos",
        "-o",
        out,
        *run_flags(url),
        "--concurrency",
        "2",
        "--cluster",
        address,
        "--summary-json",
        summary_json,
        name="run",
    )
    wait_until(lambda: line_count(out) > 0, 120, "the first records", alive=run)
    workers["w1"].popen.send_signal(signal.SIGKILL)
    workers["w1"].wait(timeout=30)
    assert line_count(out) < len(keys), "the run ended before the worker was killed"
    assert run.wait(timeout=180) == 0, run.stderr()
    records = read_out(out)  # also checks that no key is there twice
    assert sorted(records.keys) == keys
    assert all(r["status"] == "ok" and r["code"] == codes.OK for r in records.records)
    summary = json.loads(summary_json.read_text())
    assert sum(summary["workers"].values()) == len(keys) and summary["workers"]["w2"] > 0


def test_the_cluster_as_a_whole_keeps_to_qps(spawner, tmp_path):
    """Two workers against a server whose quota is exactly --qps: each worker paces at
    its share, so the server refuses nothing (two workers at the full rate each would
    be refused about half the time)."""
    qps = 30
    keys = tiny_jpegs(tmp_path / "photos", 120)
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"), "--qps-limit", qps)
    out = tmp_path / "out.jsonl"
    result = run_cli(
        "run",
        tmp_path / "photos",
        "-o",
        out,
        *run_flags(url),
        "--concurrency",
        "4",
        "--qps",
        qps,
        "--cluster",
        "local:2",
        "--summary-json",
        tmp_path / "summary.json",
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    records = read_out(out)
    assert sorted(records.keys) == keys and all(r["attempts"] == 1 for r in records.records)
    responses = server_stats(url)["responses"]
    assert responses.get(str(codes.RATE_LIMITED), 0) == 0 and responses.get("0") == len(keys)
    assert len(json.loads((tmp_path / "summary.json").read_text())["workers"]) == 2


def answer_twice(run_id: str, items: list, grant: int | None = None) -> ChunkResult:
    """A worker task whose chunk reports every record twice, as a chunk that ran twice could."""
    from distributed import get_worker

    records = [
        Record(i.key, i.kind, "ok", 0, "success", [{"tag_name": "x", "tag_confidence": 1}], 1) for i in items
    ]
    return ChunkResult(str(get_worker().name), records + records)


async def test_the_driver_writes_each_key_once_whatever_the_workers_send(tmp_path):
    keys = tiny_jpegs(tmp_path / "photos", 150)
    out = tmp_path / "out.jsonl"
    config = RunConfig(sources=[str(tmp_path / "photos")], out=str(out), cluster="local:1", tagger="color")
    sink, checkpoint = open_sink(config.out)
    try:
        summary = await run_on_cluster(config, sink, checkpoint, Progress(False), task=answer_twice)
    finally:
        await sink.close()
    assert sorted(read_out(out).keys) == keys  # read_out fails on a key written twice
    assert summary.done == len(keys) and sum(summary.workers.values()) == len(keys)


def test_ctrl_c_stops_the_cluster_run_and_a_rerun_finishes_it(spawner, tmp_path):
    """SIGINT once records arrive: exit 130 with what was received written; the rerun does
    the rest, each key once."""
    keys = tiny_jpegs(tmp_path / "photos", 400)
    _, url = spawner.serve(write_credentials(tmp_path / "creds.json"), "--inject-latency-ms", "20")
    out = tmp_path / "out.jsonl"
    flags = [
        "run",
        tmp_path / "photos",
        "-o",
        out,
        *run_flags(url),
        "--concurrency",
        "2",
        "--cluster",
        "local:1",
    ]
    run = spawner.start(*flags, name="run")
    wait_until(lambda: line_count(out) > 0, 120, "the first records", alive=run)
    run.signal(signal.SIGINT)
    assert run.wait(timeout=120) == 130, run.stderr()
    first = read_out(out).keys
    assert 0 < len(first) < len(keys)
    again = run_cli(*flags, timeout=180)
    assert again.returncode == 0, again.stderr
    assert sorted(read_out(out).keys) == keys
