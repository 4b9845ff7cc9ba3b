"""`mitm-sse doctor`: check that this machine is ready to record through mitmproxy.

Each check returns a `Finding`: ``ok`` is True (pass), None (warning or information) or False (fail), with a
concrete fix. The checks read files and environment variables only, except the loopback test, which starts a
tiny SSE server on 127.0.0.1 and a `mitmdump` subprocess on a free loopback port, streams one response through
it over plain HTTP and over HTTPS (intercepted with the CA from the confdir), and stops both. Nothing leaves
the machine.

`run_doctor()` is the Python entry point; `doctor` is the click command the main CLI registers.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import http.client
import http.server
import ipaddress
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import click

from .mitmdump_proc import MitmdumpProcess, mitmdump_command, sibling_mitmdump

CA_BASENAME = "mitmproxy"
DEFAULT_CONFDIR = Path("~/.mitmproxy")

# Hosts of common streaming LLM APIs: a NO_PROXY entry covering one of them means that traffic is never recorded.
LLM_API_HOSTS = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "api.mistral.ai",
    "api.groq.com",
    "api.deepseek.com",
    "api.together.xyz",
    "api.fireworks.ai",
    "api.cohere.com",
    "api.x.ai",
    "openrouter.ai",
)

# CA bundle environment variables: (whether a set value replaces the default roots or adds to them, who reads it).
CA_ENV_VARS: dict[str, tuple[str, str]] = {
    "SSL_CERT_FILE": (
        "replaces",
        "OpenSSL's default file: Python ssl/urllib, httpx and httpx2 (openai/anthropic SDKs), Go on Linux",
    ),
    "SSL_CERT_DIR": ("replaces", "OpenSSL's default directory: Python ssl, httpx, Go on Linux"),
    "REQUESTS_CA_BUNDLE": ("replaces", "requests (instead of certifi)"),
    "CURL_CA_BUNDLE": ("replaces", "curl, and requests when REQUESTS_CA_BUNDLE is unset"),
    "NODE_EXTRA_CA_CERTS": ("adds", "Node.js (read at start-up, added to its built-in roots)"),
}

PROXY_ENV_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
NO_PROXY_ENV_VARS = ("NO_PROXY", "no_proxy")

# Linux trust bundles, as written by update-ca-certificates / update-ca-trust / p11-kit (same list as truststore).
LINUX_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Arch, Gentoo
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # Fedora, RHEL
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL (older path)
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # Alpine, some BSD-style layouts
)

_PEM_RE = re.compile(
    rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----(.+?)-----END (?:TRUSTED )?CERTIFICATE-----", re.DOTALL
)

# The loopback test: a name that never resolves, mapped by mitmproxy to the local SSE server.
DOCTOR_HOST = "doctor.mitm-sse.invalid"
STREAM_PARTS = (
    b": mitm-sse doctor\n\nevent: ping\ndata: caf\xc3\xa9 \xe2\x9c\x93\r\n\r\n",
    b'id: 2\ndata: {"delta": "hel',
    b'lo"}\r',
    b"\n\r\ndata: [DONE]\n\n",
)
IO_TIMEOUT = 10.0
ACK_TIMEOUT = 5.0


@dataclasses.dataclass
class Finding:
    """One check. ``ok``: True passes, None is a warning (or information), False fails."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CAInfo:
    cert_path: Path  # the public file to distribute (mitmproxy-ca-cert.pem); may be missing
    key_path: Path
    der: bytes
    sha256: str
    sha1: str
    subject: str
    not_after: dt.datetime


# --------------------------------------------------------------------------------------------------------------
# certificate helpers


def _first_tlv(der: bytes) -> bytes:
    """The first DER element (a TRUSTED CERTIFICATE block is the certificate followed by OpenSSL aux data)."""
    if len(der) < 2 or der[0] != 0x30:
        return der
    n = der[1]
    if n < 0x80:
        return der[: 2 + n]
    k = n & 0x7F
    if k == 0 or k > 4 or len(der) < 2 + k:
        return der
    length = int.from_bytes(der[2 : 2 + k], "big")
    return der[: 2 + k + length]


def _ders_in(data: bytes) -> list[bytes]:
    """DER encodings of every certificate in a PEM bundle (or of a single DER file)."""
    out = []
    for m in _PEM_RE.finditer(data):
        try:
            out.append(_first_tlv(base64.b64decode(m.group(1))))
        except ValueError:
            continue
    if not out and data[:1] == b"\x30":
        out.append(_first_tlv(data))
    return out


@dataclasses.dataclass
class _BundleScan:
    path: Path
    exists: bool
    n_certs: int = 0
    contains: bool = False
    other_mitmproxy: int = 0  # certificates that look like a different mitmproxy CA
    error: str = ""


def _scan_file(path: Path, ca: CAInfo | None) -> _BundleScan:
    scan = _BundleScan(path, path.is_file())
    if not scan.exists:
        return scan
    try:
        data = path.read_bytes()
    except OSError as e:
        scan.error = f"{type(e).__name__}: {e}"
        return scan
    for der in _ders_in(data):
        scan.n_certs += 1
        if ca is not None and der == ca.der:
            scan.contains = True
        elif b"mitmproxy" in der:
            scan.other_mitmproxy += 1
    return scan


def _scan_dir(path: Path, ca: CAInfo | None, limit: int = 5000) -> _BundleScan:
    scan = _BundleScan(path, path.is_dir())
    if not scan.exists:
        return scan
    seen: set[Path] = set()
    try:
        entries = sorted(path.iterdir())[:limit]
    except OSError as e:
        scan.error = f"{type(e).__name__}: {e}"
        return scan
    for entry in entries:
        try:
            real = entry.resolve()
            if real in seen or not real.is_file() or real.stat().st_size > 4_000_000:
                continue
        except OSError:
            continue
        seen.add(real)
        sub = _scan_file(real, ca)
        scan.n_certs += sub.n_certs
        scan.contains |= sub.contains
        scan.other_mitmproxy += sub.other_mitmproxy
    return scan


def _scan(path: Path, ca: CAInfo | None) -> _BundleScan:
    return _scan_dir(path, ca) if path.is_dir() else _scan_file(path, ca)


def _load_ca(confdir: Path) -> tuple[CAInfo | None, list[Finding]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key_path = confdir / f"{CA_BASENAME}-ca.pem"
    cert_path = confdir / f"{CA_BASENAME}-ca-cert.pem"
    name = "mitmproxy CA"
    if not key_path.is_file():
        where = "the default confdir" if confdir == DEFAULT_CONFDIR.expanduser() else "this confdir"
        return None, [
            Finding(
                name,
                False,
                f"{key_path} not found: no CA in {where}",
                f"Run mitmdump once to create it: mitmdump --set confdir={confdir} (stop it with Ctrl-C), "
                "or pass --confdir DIR if your CA lives elsewhere.",
            )
        ]
    try:
        key_ders = _ders_in(key_path.read_bytes())
        if not key_ders:
            raise ValueError("no certificate block in the file")
        cert = x509.load_der_x509_certificate(key_ders[0])
    except (OSError, ValueError) as e:
        return None, [
            Finding(
                name,
                False,
                f"{key_path} is unreadable or not a PEM key + certificate: {e}",
                f"Move {confdir} aside and run mitmdump once to create a fresh CA (then trust the new one).",
            )
        ]
    der = cert.public_bytes(serialization.Encoding.DER)
    not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=dt.UTC)
    not_before = getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before.replace(tzinfo=dt.UTC)
    info = CAInfo(
        cert_path=cert_path,  # never the key file: fix texts copy this file into trust stores
        key_path=key_path,
        der=der,
        sha256=hashlib.sha256(der).hexdigest(),
        sha1=hashlib.sha1(der).hexdigest(),
        subject=cert.subject.rfc4514_string(),
        not_after=not_after,
    )
    findings = []
    now = dt.datetime.now(dt.UTC)
    detail = (
        f"{key_path} ({info.subject}), SHA-256 {_colons(info.sha256)}, "
        f"valid until {not_after.date().isoformat()}"
    )
    if not_after < now or not_before > now:
        findings.append(
            Finding(
                name,
                False,
                detail + f": not valid now (valid {not_before.date()} to {not_after.date()})",
                f"Remove the old CA from every trust store, move {confdir} aside, run mitmdump once, trust the new CA.",
            )
        )
    else:
        findings.append(Finding(name, True, detail))
    if not cert_path.is_file():
        findings.append(
            Finding(
                "CA certificate file",
                None,
                f"{cert_path} is missing: only the key file exists",
                f"Write the public part: openssl x509 -in {key_path} -out {cert_path}",
            )
        )
    else:
        try:
            cert_ders = _ders_in(cert_path.read_bytes())
        except OSError:
            cert_ders = []
        if not cert_ders or cert_ders[0] != der:
            findings.append(
                Finding(
                    "CA certificate file",
                    False,
                    f"{cert_path} is not the certificate in {key_path.name}: whoever trusts it will not trust the proxy",
                    f"Regenerate it: openssl x509 -in {key_path} -out {cert_path} (and re-trust it)",
                )
            )
    if os.name == "posix":
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            findings.append(
                Finding(
                    "CA private key permissions",
                    None,
                    f"{key_path} is mode {mode:04o}: other users can read the key that can impersonate any site",
                    f"chmod 600 {key_path} {confdir / (CA_BASENAME + '-ca.p12')} (see docs/security.md)",
                )
            )
        else:
            findings.append(Finding("CA private key permissions", True, f"{key_path} is mode {mode:04o}"))
    return info, findings


def _colons(hexdigest: str) -> str:
    return ":".join(hexdigest[i : i + 2] for i in range(0, len(hexdigest), 2)).upper()


# --------------------------------------------------------------------------------------------------------------
# trust stores


def _linux_trust_fix(ca: CAInfo) -> str:
    if shutil.which("update-ca-certificates") or Path("/usr/local/share/ca-certificates").is_dir():
        return (
            f"sudo cp {ca.cert_path} /usr/local/share/ca-certificates/mitmproxy.crt && "
            "sudo update-ca-certificates (see certs/README.md)"
        )
    if shutil.which("update-ca-trust"):
        return (
            f"sudo cp {ca.cert_path} /etc/pki/ca-trust/source/anchors/mitmproxy.pem && "
            "sudo update-ca-trust (see certs/README.md)"
        )
    if shutil.which("trust"):
        return f"sudo trust anchor --store {ca.cert_path} (see certs/README.md)"
    return "Add the CA to your distribution's trust store: see certs/README.md"


def _describe(scan: _BundleScan) -> str:
    if scan.error:
        return f"{scan.path}: {scan.error}"
    extra = f", and {scan.other_mitmproxy} other mitmproxy CA(s)" if scan.other_mitmproxy else ""
    return f"{scan.path} ({scan.n_certs} certificate{'' if scan.n_certs == 1 else 's'}{extra})"


def _check_system_store(ca: CAInfo | None) -> list[Finding]:
    name = "system trust store"
    if ca is None:
        return [Finding(name, None, "skipped: no CA to look for", "")]
    if sys.platform == "win32":
        return [_check_windows_store(ca)]
    if sys.platform == "darwin":
        sha1 = ca.sha1.upper()
        findings = [
            Finding(
                name + " (Keychain)",
                None,
                "macOS keeps trust in the Keychain, which this check cannot read. Check with: "
                f"security find-certificate -a -Z -c mitmproxy | grep -i {sha1}  and  "
                f"security verify-cert -c {ca.cert_path}",
                f"sudo security add-trusted-cert -d -p ssl -p basic -k /Library/Keychains/System.keychain "
                f"{ca.cert_path}",
            )
        ]
        findings += _check_python_default(ca)
        return findings
    # Linux and other Unix: the bundle files OpenSSL, GnuTLS, NSS (p11-kit) and truststore read.
    scans = [_scan_file(Path(p), ca) for p in LINUX_BUNDLES]
    paths = ssl.get_default_verify_paths()
    if paths.openssl_cafile and paths.openssl_cafile not in LINUX_BUNDLES:
        scans.append(_scan_file(Path(paths.openssl_cafile), ca))
    existing = [s for s in scans if s.exists]
    if not existing and paths.openssl_capath:
        capath = _scan_dir(Path(paths.openssl_capath), ca)
        if capath.exists:
            existing.append(capath)
    if not existing:
        return [Finding(name, None, "no system CA bundle found", _linux_trust_fix(ca))]
    hits = [s for s in existing if s.contains]
    if hits:
        return [Finding(name, True, "trusted in " + "; ".join(_describe(s) for s in hits))]
    detail = "not in " + "; ".join(_describe(s) for s in existing)
    if any(s.other_mitmproxy for s in existing):
        detail += ". A different mitmproxy CA is trusted: probably one from an older confdir"
    return [
        Finding(
            name,
            None,
            detail
            + ": curl, Go, Python's ssl and other OpenSSL-based tools will reject the proxy's certificates "
            "(browsers: see certs/README.md)",
            _linux_trust_fix(ca),
        )
    ]


def _check_windows_store(ca: CAInfo) -> Finding:
    name = "system trust store (Windows)"
    thumb = ca.sha1.upper()
    how = (
        f"Check with: certutil -user -verifystore Root {thumb}  or  "
        f"Get-ChildItem Cert:\\CurrentUser\\Root, Cert:\\LocalMachine\\Root | Where-Object Thumbprint -eq {thumb}"
    )
    fix = f'certutil -user -addstore Root "{ca.cert_path.with_suffix(".cer")}" (or as admin without -user)'
    enum = getattr(ssl, "enum_certificates", None)
    if enum is None:
        return Finding(name, None, how, fix)
    others = 0
    try:
        for der, encoding, _trust in enum("ROOT"):
            if encoding != "x509_asn":
                continue
            if der == ca.der:
                return Finding(name, True, f"in the ROOT store (thumbprint {thumb})")
            if b"mitmproxy" in der:
                others += 1
    except OSError as e:
        return Finding(name, None, f"could not read the ROOT store ({e}). {how}", fix)
    extra = f" ({others} other mitmproxy CA(s) are, probably from an older confdir)" if others else ""
    return Finding(name, None, f"not in the ROOT store{extra}. {how}", fix)


def _check_python_default(ca: CAInfo) -> list[Finding]:
    paths = ssl.get_default_verify_paths()
    scans = []
    if paths.openssl_cafile and Path(paths.openssl_cafile).is_file():
        scans.append(_scan_file(Path(paths.openssl_cafile), ca))
    if not scans:
        return []
    hits = [s for s in scans if s.contains]
    name = "Python ssl default bundle"
    if hits:
        return [Finding(name, True, "contains the CA: " + "; ".join(_describe(s) for s in hits))]
    return [
        Finding(
            name,
            None,
            "urllib and ssl.create_default_context() in this Python use "
            + "; ".join(_describe(s) for s in scans)
            + ", which lacks the CA",
            "Set SSL_CERT_FILE to a bundle that contains the CA (certs/README.md, 'Python')",
        )
    ]


def _combined_bundle(ca: CAInfo) -> Path:
    return ca.key_path.parent / "combined-ca.pem"


def _combined_bundle_fix(ca: CAInfo, var: str) -> str:
    return f'cat "$(python -m certifi)" {ca.cert_path} > {_combined_bundle(ca)} && export {var}={_combined_bundle(ca)}'


def _check_certifi(ca: CAInfo | None, env_ok: dict[str, bool]) -> Finding:
    name = "certifi bundle"
    try:
        import certifi
    except ImportError:
        return Finding(name, None, "certifi is not installed in this Python", "")
    scan = _scan_file(Path(certifi.where()), ca)
    if ca is None:
        return Finding(name, None, f"{_describe(scan)}; skipped: no CA to look for", "")
    if scan.contains:
        return Finding(
            name,
            True,
            f"{_describe(scan)} contains the CA (a certifi upgrade will drop it again)",
        )
    covered = env_ok.get("SSL_CERT_FILE") and (
        env_ok.get("REQUESTS_CA_BUNDLE") or env_ok.get("CURL_CA_BUNDLE")
    )
    if covered:
        return Finding(
            name,
            True,
            f"{_describe(scan)} lacks the CA, but SSL_CERT_FILE and REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE cover "
            "httpx and requests",
        )
    return Finding(
        name,
        None,
        f"{_describe(scan)} lacks the CA: requests and httpx (openai < 3 SDK) use certifi and will reject "
        "the proxy unless SSL_CERT_FILE / REQUESTS_CA_BUNDLE point to a bundle with it",
        _combined_bundle_fix(ca, "SSL_CERT_FILE") + f" REQUESTS_CA_BUNDLE={_combined_bundle(ca)}",
    )


def _check_ca_env(ca: CAInfo | None) -> tuple[list[Finding], dict[str, bool]]:
    findings = []
    env_ok: dict[str, bool] = {}
    for var, (kind, who) in CA_ENV_VARS.items():
        name = f"${var}"
        value = os.environ.get(var, "")
        if not value:
            if var == "NODE_EXTRA_CA_CERTS":
                fix = f"export NODE_EXTRA_CA_CERTS={ca.cert_path}" if ca is not None else ""
                findings.append(
                    Finding(
                        name,
                        None,
                        "not set: Node.js apps trust only their built-in roots, not the proxy",
                        fix,
                    )
                )
            else:
                findings.append(Finding(name, True, f"not set, so the defaults above apply (read by {who})"))
            continue
        path = Path(value).expanduser()
        scan = _scan(path, ca)
        if not scan.exists:
            findings.append(
                Finding(
                    name,
                    False,
                    f"{value} does not exist: every client that reads it ({who}) fails TLS",
                    f"unset {var}, or point it at an existing bundle",
                )
            )
            continue
        if ca is None:
            findings.append(Finding(name, None, f"{_describe(scan)}; skipped: no CA to look for", ""))
            continue
        if not scan.contains:
            other = ": it has a different mitmproxy CA (older confdir?)" if scan.other_mitmproxy else ""
            if var == "SSL_CERT_DIR" and env_ok.get("SSL_CERT_FILE"):
                # OpenSSL trusts the union of file and directory, and httpx prefers SSL_CERT_FILE.
                findings.append(
                    Finding(name, True, f"{_describe(scan)} lacks the CA, but $SSL_CERT_FILE has it{other}")
                )
                continue
            if var == "NODE_EXTRA_CA_CERTS":
                fix = f"export NODE_EXTRA_CA_CERTS={ca.cert_path}"
            elif path.is_dir():
                fix = f"cp {ca.cert_path} {path}/mitmproxy.pem && openssl rehash {path}"
            elif str(path) in LINUX_BUNDLES:
                fix = f"{var} points at the system bundle: trust the CA system-wide ({_linux_trust_fix(ca)})"
            else:
                fix = _combined_bundle_fix(ca, var)
            findings.append(
                Finding(
                    name,
                    False,
                    f"{_describe(scan)} lacks the CA{other}: {who} will reject the proxy's certificates",
                    fix,
                )
            )
            continue
        env_ok[var] = True
        if kind == "replaces" and scan.n_certs == 1:
            if path.is_dir():
                fix = f"unset {var} once the CA is trusted system-wide ({_linux_trust_fix(ca)})"
            else:
                fix = _combined_bundle_fix(ca, var)
            findings.append(
                Finding(
                    name,
                    None,
                    f"{value} holds only the mitmproxy CA: hosts that bypass interception (NO_PROXY, "
                    "ignore_hosts/allow_hosts) present their real certificates and will fail",
                    fix,
                )
            )
        else:
            findings.append(Finding(name, True, f"{_describe(scan)} contains the CA"))
    return findings, env_ok


# --------------------------------------------------------------------------------------------------------------
# proxy settings


def mask_proxy_url(value: str) -> str:
    """Hide credentials in a proxy URL (``http://user:pass@host:port`` -> ``http://***@host:port``)."""
    try:
        parts = urllib.parse.urlsplit(value if "://" in value else "http://" + value)
    except ValueError:
        return value
    if parts.username is None and parts.password is None:
        return value
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def no_proxy_matches(no_proxy: str, host: str) -> str | None:
    """The NO_PROXY entry that makes ``host`` bypass the proxy, or None.

    Follows the common reading of curl, Python (urllib, requests, httpx) and Go: ``*`` matches everything,
    ``example.com``, ``.example.com`` and ``*.example.com`` match the domain and its subdomains, ports are ignored.
    """
    host = host.lower().rstrip(".")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return raw.strip()
        name = entry
        if name.startswith("*."):
            name = name[2:]
        name = name.lstrip(".")
        if name.startswith("[") or name.count(":") > 1:  # IPv6 literal or CIDR: never a hostname
            continue
        name = name.rsplit(":", 1)[0] if ":" in name else name
        if name and (host == name or host.endswith("." + name)):
            return raw.strip()
    return None


def _system_proxy() -> tuple[str, str]:
    """(description, https proxy or "") of the desktop's proxy settings, where this platform exposes them."""
    if sys.platform == "darwin":
        getter = getattr(urllib.request, "getproxies_macosx_sysconf", None)
        proxies = getter() if getter else {}
        https = proxies.get("https", "")
        return (f"macOS network settings: {proxies or 'none'}", https)
    if sys.platform == "win32":
        getter = getattr(urllib.request, "getproxies_registry", None)
        proxies = getter() if getter else {}
        https = proxies.get("https", "")
        return (f"Windows Internet settings: {proxies or 'none'}", https)
    gsettings = shutil.which("gsettings")
    if gsettings and (os.environ.get("DBUS_SESSION_BUS_ADDRESS") or os.environ.get("XDG_CURRENT_DESKTOP")):

        def get(schema: str, key: str) -> str:
            try:
                out = subprocess.run(
                    [gsettings, "get", schema, key], capture_output=True, text=True, timeout=3, check=False
                )
            except (OSError, subprocess.TimeoutExpired):
                return ""
            return out.stdout.strip().strip("'")

        mode = get("org.gnome.system.proxy", "mode")
        if mode == "manual":
            host = get("org.gnome.system.proxy.https", "host")
            port = get("org.gnome.system.proxy.https", "port")
            https = f"http://{host}:{port}" if host else ""
            return (f"GNOME proxy: manual, https {host}:{port}", https)
        if mode:
            return (f"GNOME proxy: {mode}", "")
    return ("", "")


def _check_proxy_env(ca: CAInfo | None) -> list[Finding]:
    findings = []
    set_vars = {v: os.environ[v] for v in PROXY_ENV_VARS if os.environ.get(v)}
    shown = ", ".join(f"{k}={mask_proxy_url(v)}" for k, v in set_vars.items())
    system_desc, system_https = _system_proxy()
    https_env = next(
        (
            os.environ[v]
            for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
            if os.environ.get(v)
        ),
        "",
    )
    fix_env = (
        "export HTTPS_PROXY=http://127.0.0.1:8080 HTTP_PROXY=http://127.0.0.1:8080 (and the lowercase forms)"
    )
    if https_env:
        detail = shown + (f"; {system_desc}" if system_desc else "")
        problems = []
        for upper in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
            lo, up = os.environ.get(upper.lower()), os.environ.get(upper)
            if lo and up and lo != up:
                problems.append(f"{upper} and {upper.lower()} differ (most tools prefer the lowercase one)")
            elif up and not lo and upper == "HTTP_PROXY":
                problems.append(
                    "HTTP_PROXY is set but http_proxy is not: curl only reads the lowercase http_proxy"
                )
        if problems:
            findings.append(Finding("proxy settings", None, detail + ". " + "; ".join(problems), fix_env))
        else:
            findings.append(Finding("proxy settings", True, detail))
    elif system_https:
        findings.append(
            Finding(
                "proxy settings",
                True,
                f"{system_desc}; no HTTPS_PROXY: command-line tools and SDKs ignore the desktop setting",
                fix_env,
            )
        )
    else:
        detail = (shown + "; " if shown else "") + (system_desc + "; " if system_desc else "")
        findings.append(
            Finding(
                "proxy settings",
                None,
                detail + "no HTTPS proxy configured: apps reach the APIs directly unless you use local, "
                "transparent or WireGuard mode",
                fix_env,
            )
        )

    no_proxy_vals = {v: os.environ[v] for v in NO_PROXY_ENV_VARS if os.environ.get(v)}
    if not no_proxy_vals:
        findings.append(Finding("NO_PROXY", True, "not set: no host bypasses the proxy"))
    else:
        covered = []
        for var, value in no_proxy_vals.items():
            for host in LLM_API_HOSTS:
                entry = no_proxy_matches(value, host)
                if entry is not None:
                    covered.append(f"{host} (by '{entry}' in {var})")
        vals = ", ".join(f"{k}={v}" for k, v in no_proxy_vals.items())
        if covered:
            findings.append(
                Finding(
                    "NO_PROXY",
                    None,
                    f"{vals}: these API hosts bypass the proxy and will not be recorded: "
                    + ", ".join(covered),
                    "Remove those entries from NO_PROXY and no_proxy (keep localhost,127.0.0.1,::1)",
                )
            )
        else:
            findings.append(Finding("NO_PROXY", True, f"{vals}: no common LLM API host bypasses the proxy"))

    target = https_env or system_https
    if target:
        findings.append(_check_running_proxy(target, ca))
    return findings


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_running_proxy(proxy_url: str, ca: CAInfo | None) -> Finding:
    """If the configured proxy is on this machine, is something listening, and is it mitmproxy with our CA?"""
    name = "proxy listener"
    try:
        parts = urllib.parse.urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 8080)
    except ValueError:
        return Finding(name, None, f"cannot parse proxy URL {mask_proxy_url(proxy_url)}", "")
    if not _is_loopback(host):
        return Finding(name, None, f"proxy {host}:{port} is not on this machine: not probed", "")
    if parts.scheme not in ("http", ""):
        return Finding(name, None, f"proxy scheme {parts.scheme}: not probed", "")
    try:
        conn = http.client.HTTPConnection(host, port, timeout=3)
        conn.request("GET", "http://mitm.it/cert/pem", headers={"Host": "mitm.it"})
        resp = conn.getresponse()
        body = resp.read(65536)
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return Finding(
            name,
            None,
            f"nothing answers at {host}:{port} ({type(e).__name__}): the proxy is not running",
            f"mitmdump --listen-host {host} -p {port} -s mitm_sse/record.py",
        )
    ders = _ders_in(body) if resp.status == 200 else []
    if not ders:
        return Finding(
            name,
            None,
            f"{host}:{port} answers but did not serve a CA at http://mitm.it/cert/pem (HTTP {resp.status}): "
            "not mitmproxy, or its onboarding app is off",
            "",
        )
    detail = f"mitmproxy at {host}:{port} serves CA SHA-256 {_colons(hashlib.sha256(ders[0]).hexdigest())}"
    if ca is not None and ders[0] != ca.der:
        return Finding(
            name,
            False,
            detail + f", not the CA in {ca.key_path.parent}: clients that trust that CA will reject it",
            f"Restart the proxy with --set confdir={ca.key_path.parent}, or run doctor with the proxy's --confdir",
        )
    return Finding(name, True, detail + (" (the CA checked above)" if ca is not None else ""))


# --------------------------------------------------------------------------------------------------------------
# mitmdump


def _check_mitmdump() -> Finding:
    name = "mitmdump"
    try:
        from mitmproxy import version

        ours = f"mitmproxy {version.VERSION} in {sys.executable}"
    except ImportError:
        return Finding(
            name, False, f"mitmproxy is not importable from {sys.executable}", "pip install mitm-sse"
        )
    sibling = sibling_mitmdump()
    on_path = shutil.which("mitmdump")
    if on_path is None:
        return Finding(
            name,
            None,
            f"{ours}; no mitmdump on PATH",
            f"Activate this environment, or run {sibling if sibling.is_file() else 'python -m mitmproxy...'}",
        )
    try:
        same = Path(on_path).resolve() == sibling.resolve()
    except OSError:
        same = False
    if same:
        return Finding(name, True, f"{on_path} ({ours})")
    return Finding(
        name,
        None,
        f"mitmdump on PATH is {on_path}, not this environment's ({ours}): it may not import mitm_sse and its "
        "dependencies (standalone binaries and other installs cannot)",
        f"Run {sibling} -s mitm_sse/record.py, or activate this environment first",
    )


class _SSEServer:
    """A one-route HTTP/1.1 server on 127.0.0.1 that streams STREAM_PARTS (chunked), waiting for the client to
    acknowledge the first part before sending the rest: if the proxy buffers, the ack never comes in time."""

    def __init__(self) -> None:
        outer = self
        self.ack = threading.Event()
        self.acked_in_time: bool | None = None
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, part in enumerate(STREAM_PARTS):
                    if i == 1:
                        outer.acked_in_time = outer.ack.wait(ACK_TIMEOUT)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="doctor-sse", daemon=True)

    def __enter__(self) -> _SSEServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ack.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def reset(self) -> None:
        self.ack = threading.Event()
        self.acked_in_time = None


def _stream_once(
    proxy_port: int, server: _SSEServer, tls: bool, cafile: Path | None = None
) -> tuple[bytes, bool | None, float]:
    """GET the SSE stream through the proxy; returns (body bytes, streamed unbuffered?, seconds)."""
    server.reset()
    t0 = time.monotonic()
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context(cafile=str(cafile))
        conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, timeout=IO_TIMEOUT, context=ctx)
        conn.set_tunnel(DOCTOR_HOST, 443)
        target = "/v1/doctor/stream"
    else:
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=IO_TIMEOUT)
        target = f"http://127.0.0.1:{server.port}/v1/doctor/stream"
    try:
        conn.request("GET", target, headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} {resp.reason}: {resp.read(300)!r}")
        body = bytearray()
        while True:
            data = resp.read1(65536)
            if not data:
                break
            body += data
            if len(body) >= len(STREAM_PARTS[0]):
                server.ack.set()
    finally:
        conn.close()
    return bytes(body), server.acked_in_time, time.monotonic() - t0


def _loopback_findings(confdir: Path, ca: CAInfo | None) -> list[Finding]:
    expected = b"".join(STREAM_PARTS)
    findings = []
    with tempfile.TemporaryDirectory(prefix="mitm-sse-doctor-") as tmp:
        conf = Path(tmp) / "conf"
        conf.mkdir(mode=0o700)
        if ca is not None:
            # The CA (with its key) is copied into a private temporary confdir, so that the user's config.yaml
            # and other settings in the confdir do not change the test; the copy is deleted right after.
            with open(
                os.open(conf / ca.key_path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb"
            ) as f:
                f.write(ca.key_path.read_bytes())
            dh = ca.key_path.parent / f"{CA_BASENAME}-dhparam.pem"
            if dh.is_file():
                shutil.copyfile(dh, conf / dh.name)
            cafile = ca.cert_path
            if not cafile.is_file():
                cafile = Path(tmp) / "ca-cert.pem"
                cafile.write_text(ssl.DER_cert_to_PEM_cert(ca.der))
            which_ca = f"the CA in {confdir}"
        else:
            cafile = conf / f"{CA_BASENAME}-ca-cert.pem"  # created by mitmdump at start
            which_ca = "a throwaway CA (none in the confdir)"
        try:
            with _SSEServer() as server:
                args = [
                    "--set",
                    "stream_large_bodies=1",
                    "--set",
                    "connection_strategy=lazy",
                    "--map-remote",
                    f"|https://{re.escape(DOCTOR_HOST)}|http://127.0.0.1:{server.port}",
                ]
                with MitmdumpProcess(conf, args, Path(tmp) / "mitmdump.log") as proxy:
                    for tls in (False, True):
                        name = "loopback proxy " + ("HTTPS (CA)" if tls else "HTTP")
                        try:
                            body, streamed, secs = _stream_once(proxy.port, server, tls, cafile)
                        except (OSError, RuntimeError, http.client.HTTPException) as e:
                            if tls and isinstance(e, ssl.SSLError):
                                fix = (
                                    f"{cafile} does not verify the proxy's certificates: regenerate it from "
                                    f"{CA_BASENAME}-ca.pem (openssl x509 -in ... -out ...)"
                                )
                            else:
                                fix = "Look at the mitmdump output above; run it by hand with the same flags"
                            tail = proxy.log_tail()
                            findings.append(
                                Finding(
                                    name,
                                    False,
                                    f"{type(e).__name__}: {e}" + (f" | {tail}" if tail else ""),
                                    fix,
                                )
                            )
                            continue
                        findings.append(
                            _judge_stream(name, body, expected, streamed, secs, which_ca if tls else "")
                        )
        except RuntimeError as e:
            findings.append(
                Finding(
                    "loopback proxy",
                    False,
                    f"could not start mitmdump ({' '.join(mitmdump_command())}): {e}",
                    "pip install --force-reinstall mitmproxy in this environment; check that it starts by hand",
                )
            )
    return findings


def _judge_stream(
    name: str, body: bytes, expected: bytes, streamed: bool | None, secs: float, via: str
) -> Finding:
    via = f", via {via}" if via else ""
    if body != expected:
        return Finding(
            name,
            False,
            f"received {len(body)} bytes, expected {len(expected)}: the stream was altered{via}",
            "Check mitmproxy options that rewrite bodies (modify_body, scripts) in your config.yaml",
        )
    if not streamed:
        return Finding(
            name,
            None,
            f"{len(body)} bytes intact but buffered: the first event did not reach the client before the "
            f"server sent the rest{via}",
            "Check stream_large_bodies and anything between the client and mitmproxy",
        )
    return Finding(
        name, True, f"{len(body)} bytes of SSE streamed intact and unbuffered in {secs * 1000:.0f} ms{via}"
    )


# --------------------------------------------------------------------------------------------------------------
# entry points


def run_doctor(confdir: Path | None = None, start_proxy: bool = True) -> list[Finding]:
    """Run every check and return the findings (see the module docstring)."""
    confdir = Path(confdir).expanduser() if confdir is not None else DEFAULT_CONFDIR.expanduser()
    findings: list[Finding] = []
    ca, ca_findings = _load_ca(confdir)
    findings += ca_findings
    findings += _check_system_store(ca)
    env_findings, env_ok = _check_ca_env(ca)
    findings.append(_check_certifi(ca, env_ok))
    findings += env_findings
    findings += _check_proxy_env(ca)
    findings.append(_check_mitmdump())
    if start_proxy:
        findings += _loopback_findings(confdir, ca)
    else:
        findings.append(Finding("loopback proxy", None, "skipped (--no-proxy-test)", ""))
    return findings


def exit_code(findings: list[Finding]) -> int:
    """0 when nothing failed (warnings allowed), 1 when a check failed."""
    return 1 if any(f.ok is False for f in findings) else 0


def render(findings: list[Finding], console: object | None = None) -> None:
    """Print the findings as a rich table (the fix under each detail, so narrow terminals stay readable)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(title="mitm-sse doctor", show_lines=True, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", style="bold")
    table.add_column("detail / fix", overflow="fold")
    marks = {
        True: Text("ok", style="green"),
        None: Text("warn", style="yellow"),
        False: Text("FAIL", style="bold red"),
    }
    for f in findings:
        cell = Text(f.detail)
        if f.fix:
            cell.append("\nfix: ", style="bold cyan")
            cell.append(f.fix, style="cyan")
        table.add_row(marks[f.ok], Text(f.name), cell)
    console.print(table)
    failed = sum(f.ok is False for f in findings)
    warned = sum(f.ok is None for f in findings)
    summary = f"{failed} failed, {warned} warnings, {sum(f.ok is True for f in findings)} ok"
    console.print(Text(summary, style="bold red" if failed else "bold green"))


@click.command()
@click.option(
    "--confdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="mitmproxy confdir holding the CA (default ~/.mitmproxy; the value of --set confdir=...).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--no-proxy-test", is_flag=True, help="Skip the loopback test (it starts mitmdump on 127.0.0.1)."
)
@click.pass_context
def doctor(ctx: click.Context, confdir: Path | None, as_json: bool, no_proxy_test: bool) -> None:
    """Check the mitmproxy CA, trust stores, CA and proxy environment, and stream one SSE response through mitmdump."""
    findings = run_doctor(confdir=confdir, start_proxy=not no_proxy_test)
    code = exit_code(findings)
    if as_json:
        click.echo(json.dumps({"ok": code == 0, "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        render(findings)
    ctx.exit(code)


if __name__ == "__main__":
    doctor()
