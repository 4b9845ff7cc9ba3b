"""`mitm-sse doctor`: findings on a temporary confdir, the loopback proxy test, and the click command.

Loopback only: the SSE server and mitmdump listen on 127.0.0.1; the environment is cleaned so the machine's own
proxy and CA variables do not leak in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import certifi
import pytest
from click.testing import CliRunner
from mitmproxy.certs import CertStore

from mitm_sse import doctor as d
from mitm_sse.mitmdump_proc import free_port

pytestmark = pytest.mark.timeout(120)

ENV_VARS = [
    *d.CA_ENV_VARS,
    *d.PROXY_ENV_VARS,
    *d.NO_PROXY_ENV_VARS,
    "DBUS_SESSION_BUS_ADDRESS",
    "XDG_CURRENT_DESKTOP",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("confdir")
    CertStore.from_store(path, "mitmproxy", 2048)
    return path


@pytest.fixture
def own_ca(tmp_path, ca_dir) -> Path:
    """A copy of the module CA that a test may damage."""
    path = tmp_path / "own-confdir"
    shutil.copytree(ca_dir, path)
    return path


@pytest.fixture(scope="module")
def other_ca_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other-confdir")
    CertStore.from_store(path, "mitmproxy", 2048)
    return path


def by_name(findings: list[d.Finding]) -> dict[str, d.Finding]:
    names = [f.name for f in findings]
    assert len(names) == len(set(names)), names
    return {f.name: f for f in findings}


def combined_bundle(tmp_path: Path, ca_dir: Path) -> Path:
    bundle = tmp_path / "combined.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + (ca_dir / "mitmproxy-ca-cert.pem").read_bytes())
    return bundle


def test_full_run_with_loopback(tmp_path, ca_dir, monkeypatch):
    bundle = combined_bundle(tmp_path, ca_dir)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("NODE_EXTRA_CA_CERTS", str(ca_dir / "mitmproxy-ca-cert.pem"))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(ca_dir / "mitmproxy-ca-cert.pem"))  # only the CA: a warning

    findings = d.run_doctor(confdir=ca_dir, start_proxy=True)
    f = by_name(findings)

    assert f["mitmproxy CA"].ok is True
    assert "O=mitmproxy" in f["mitmproxy CA"].detail
    assert f["CA private key permissions"].ok is True
    assert f["$SSL_CERT_FILE"].ok is True
    assert f["$REQUESTS_CA_BUNDLE"].ok is True
    assert f["$NODE_EXTRA_CA_CERTS"].ok is True
    assert f["$SSL_CERT_DIR"].ok is True  # unset: defaults apply
    assert f["$CURL_CA_BUNDLE"].ok is None
    assert "only the mitmproxy CA" in f["$CURL_CA_BUNDLE"].detail
    assert f["certifi bundle"].ok is True  # lacks the CA, but the variables cover httpx and requests
    assert f["system trust store"].ok is None  # a fresh CA is trusted nowhere
    assert f["system trust store"].fix
    assert f["proxy settings"].ok is None
    assert f["NO_PROXY"].ok is True

    for name in ("loopback proxy HTTP", "loopback proxy HTTPS (CA)"):
        assert f[name].ok is True, f[name]
        assert (
            f"{len(b''.join(d.STREAM_PARTS))} bytes of SSE streamed intact and unbuffered" in f[name].detail
        )
    assert str(ca_dir) in f["loopback proxy HTTPS (CA)"].detail
    assert d.exit_code(findings) == 0
    for finding in findings:
        if finding.ok is not True:
            assert finding.detail


def test_missing_ca_fails_with_fix(tmp_path):
    findings = d.run_doctor(confdir=tmp_path, start_proxy=False)
    f = by_name(findings)
    assert f["mitmproxy CA"].ok is False
    assert "mitmdump" in f["mitmproxy CA"].fix and str(tmp_path) in f["mitmproxy CA"].fix
    assert f["system trust store"].ok is None
    assert f["loopback proxy"].ok is None
    assert d.exit_code(findings) == 1


def test_loopback_without_ca_uses_throwaway_ca(tmp_path):
    findings = d.run_doctor(confdir=tmp_path, start_proxy=True)
    f = by_name(findings)
    assert f["loopback proxy HTTP"].ok is True
    assert f["loopback proxy HTTPS (CA)"].ok is True
    assert "throwaway" in f["loopback proxy HTTPS (CA)"].detail
    assert not (tmp_path / "mitmproxy-ca.pem").exists()  # the user's confdir is left alone


def test_ca_env_vars_that_break_trust(tmp_path, ca_dir, other_ca_dir, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("NODE_EXTRA_CA_CERTS", str(other_ca_dir / "mitmproxy-ca-cert.pem"))
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    shutil.copy(ca_dir / "mitmproxy-ca-cert.pem", certs_dir / "mitmproxy.pem")
    shutil.copy(certifi.where(), certs_dir / "public-roots.pem")
    monkeypatch.setenv("SSL_CERT_DIR", str(certs_dir))

    findings = d.run_doctor(confdir=ca_dir, start_proxy=False)
    f = by_name(findings)
    assert f["$SSL_CERT_FILE"].ok is False and "does not exist" in f["$SSL_CERT_FILE"].detail
    assert f["$REQUESTS_CA_BUNDLE"].ok is False and "lacks the CA" in f["$REQUESTS_CA_BUNDLE"].detail
    assert "combined-ca.pem" in f["$REQUESTS_CA_BUNDLE"].fix
    node = f["$NODE_EXTRA_CA_CERTS"]
    assert node.ok is False and "different mitmproxy CA" in node.detail
    assert str(ca_dir / "mitmproxy-ca-cert.pem") in node.fix
    assert f["$SSL_CERT_DIR"].ok is True  # a directory holding the CA
    assert f["certifi bundle"].ok is None
    assert d.exit_code(findings) == 1


def test_unset_node_extra_ca_certs_warns(ca_dir):
    f = by_name(d.run_doctor(confdir=ca_dir, start_proxy=False))
    assert f["$NODE_EXTRA_CA_CERTS"].ok is None
    assert f["$NODE_EXTRA_CA_CERTS"].fix == f"export NODE_EXTRA_CA_CERTS={ca_dir / 'mitmproxy-ca-cert.pem'}"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_readable_key_and_mismatched_cert_file(own_ca, other_ca_dir):
    (own_ca / "mitmproxy-ca.pem").chmod(0o644)
    shutil.copy(other_ca_dir / "mitmproxy-ca-cert.pem", own_ca / "mitmproxy-ca-cert.pem")
    findings = d.run_doctor(confdir=own_ca, start_proxy=False)
    f = by_name(findings)
    assert f["CA private key permissions"].ok is None
    assert (
        "0644" in f["CA private key permissions"].detail
        and "chmod 600" in f["CA private key permissions"].fix
    )
    assert f["CA certificate file"].ok is False
    assert d.exit_code(findings) == 1


def test_missing_cert_file_never_suggests_copying_the_key(own_ca):
    (own_ca / "mitmproxy-ca-cert.pem").unlink()
    findings = d.run_doctor(confdir=own_ca, start_proxy=True)
    f = by_name(findings)
    assert f["CA certificate file"].ok is None and "openssl x509" in f["CA certificate file"].fix
    assert (
        f["loopback proxy HTTPS (CA)"].ok is True
    )  # the client trusts the certificate taken from the key file
    for finding in findings:
        assert (
            "mitmproxy-ca.pem /" not in finding.fix
        )  # e.g. never "cp .../mitmproxy-ca.pem /usr/local/share/..."


def test_proxy_environment(monkeypatch, ca_dir):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", f"http://alice:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,.openai.com")
    monkeypatch.setenv("no_proxy", "*")
    f = by_name(d.run_doctor(confdir=ca_dir, start_proxy=False))

    settings = f["proxy settings"]
    assert "s3cret" not in settings.detail and "alice" not in settings.detail
    assert "***@127.0.0.1" in settings.detail
    assert settings.ok is None and "differ" in settings.detail

    no_proxy = f["NO_PROXY"]
    assert no_proxy.ok is None
    assert "api.openai.com (by '.openai.com' in NO_PROXY)" in no_proxy.detail
    assert "api.anthropic.com (by '*' in no_proxy)" in no_proxy.detail

    listener = f["proxy listener"]
    assert listener.ok is None and "not running" in listener.detail
    assert f"-p {port}" in listener.fix


def test_running_proxy_is_identified_by_its_ca(tmp_path, ca_dir, other_ca_dir, monkeypatch):
    conf = tmp_path / "proxy-conf"
    conf.mkdir()
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem"):  # mitm.it/cert/pem serves the -cert.pem file
        shutil.copy(ca_dir / name, conf / name)
    with d.MitmdumpProcess(conf) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
        same = by_name(d.run_doctor(confdir=ca_dir, start_proxy=False))["proxy listener"]
        other = by_name(d.run_doctor(confdir=other_ca_dir, start_proxy=False))["proxy listener"]
    assert proxy.proc.poll() is not None  # stopped
    assert same.ok is True and "mitmproxy at 127.0.0.1" in same.detail
    assert other.ok is False and f"confdir={other_ca_dir}" in other.fix


@pytest.mark.parametrize(
    ("no_proxy", "host", "entry"),
    [
        ("*", "api.openai.com", "*"),
        ("localhost, .openai.com", "api.openai.com", ".openai.com"),
        ("openai.com", "api.openai.com", "openai.com"),
        ("*.anthropic.com", "api.anthropic.com", "*.anthropic.com"),
        ("api.anthropic.com:443", "api.anthropic.com", "api.anthropic.com:443"),
        ("API.OpenAI.com", "api.openai.com", "API.OpenAI.com"),
        ("notopenai.com", "api.openai.com", None),
        ("penai.com,localhost,127.0.0.1,::1,10.0.0.0/8", "api.openai.com", None),
        ("", "api.openai.com", None),
    ],
)
def test_no_proxy_matches(no_proxy, host, entry):
    assert d.no_proxy_matches(no_proxy, host) == entry


def test_mask_proxy_url():
    assert d.mask_proxy_url("http://u:p@127.0.0.1:8080") == "http://***@127.0.0.1:8080"
    assert d.mask_proxy_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


def test_judge_stream():
    expected = b"".join(d.STREAM_PARTS)
    assert d._judge_stream("x", expected, expected, True, 0.01, "").ok is True
    assert d._judge_stream("x", expected[:-1], expected, True, 0.01, "").ok is False
    buffered = d._judge_stream("x", expected, expected, False, 5.0, "")
    assert buffered.ok is None and "buffered" in buffered.detail


def test_cli_json(ca_dir):
    result = CliRunner().invoke(d.doctor, ["--confdir", str(ca_dir), "--json", "--no-proxy-test"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True
    names = [f["name"] for f in data["findings"]]
    assert names[0] == "mitmproxy CA" and "loopback proxy" in names
    for f in data["findings"]:
        assert set(f) == {"name", "ok", "detail", "fix"}
        assert f["ok"] in (True, False, None)


def test_cli_json_failure_exit_code(tmp_path):
    result = CliRunner().invoke(d.doctor, ["--confdir", str(tmp_path), "--json", "--no-proxy-test"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["ok"] is False
    assert data["findings"][0] == {
        "name": "mitmproxy CA",
        "ok": False,
        "detail": f"{tmp_path / 'mitmproxy-ca.pem'} not found: no CA in this confdir",
        "fix": data["findings"][0]["fix"],
    }


def test_cli_table(ca_dir):
    result = CliRunner().invoke(d.doctor, ["--confdir", str(ca_dir), "--no-proxy-test"])
    assert result.exit_code == 0, result.output
    assert "mitm-sse doctor" in result.output
    assert "mitmproxy CA" in result.output
    assert "0 failed" in result.output
