"""``printrelay client add-printer``: a relay printer as a print queue of this computer (CUPS: Linux, macOS).

What a person would otherwise do by hand, in one command:

1. ask the relay, over IPP as CUPS will, for the printer's attributes with the person's email and password
   (a wrong password, an unknown printer or an unreachable relay stop here, said in one line);
2. make a token of the person's own for this queue (``POST /v1/me/tokens``): the queue keeps that in its
   device URI, not the password, and it can be revoked on its own;
3. ``lpadmin -p QUEUE -E -v ipps://EMAIL:TOKEN@HOST/ipp/print/ID -m everywhere``;
4. wait until CUPS has made the queue's options (duplex, media, colour) from the printer's attributes. CUPS
   does that after lpadmin returns, and quietly leaves a queue without options when it cannot: then the
   queue is removed again, the token revoked, and the command says so.

lpadmin talks to the CUPS of this computer, or to ``CUPS_SERVER`` when that is set.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass

import httpx

from ipp import DelimiterTag, IPPError, Operation, Status, ValueTag, decode, encode, keyword, new_request
from printrelay.api_client import SubmitFailed

#: how long CUPS may take to make the queue's options (it asks the relay for the printer's attributes)
PPD_TIMEOUT = 60.0
LPADMIN_TIMEOUT = 60.0
#: CUPS queue names: printable, no space, "/", "\\", "#", "@" or quotes; at most 127 characters
QUEUE_RE = re.compile(r"^[^\s/\\#@'\"]{1,127}$")


class InstallFailed(SubmitFailed):
    """A one-line reason the printer was not added (the command exits 1)."""


def add_client_arguments(client: argparse.ArgumentParser) -> None:
    add = client.add_subparsers(metavar="ACTION").add_parser(
        "add-printer",
        help="add a relay printer as a print queue of this computer (CUPS: Linux, macOS)",
        description="Add a relay printer as a CUPS print queue with the printer's own options "
        "(lpadmin -m everywhere), signed in as you: the queue keeps a token of your own, not your password.",
    )
    add.add_argument(
        "--relay",
        default=os.environ.get("PRINTRELAY_RELAY_URL"),
        help="the relay's URL, e.g. https://print.example.com (env PRINTRELAY_RELAY_URL)",
    )
    add.add_argument("--printer", required=True, help="the printer's id at the relay")
    add.add_argument("--queue", help="the queue's name on this computer (default: the printer id)")
    add.add_argument(
        "--user",
        default=os.environ.get("PRINTRELAY_USER"),
        help="your email (env PRINTRELAY_USER; else asked)",
    )
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (else asked, hidden)",
    )
    add.set_defaults(run=run_add_printer)


@dataclass(frozen=True)
class Relay:
    """Where the relay is: its HTTP base URL and the IPP URI of one of its printers."""

    base: str  # https://host[:port]
    printer_id: str

    @property
    def ipp_path(self) -> str:
        return f"/ipp/print/{urllib.parse.quote(self.printer_id, safe='')}"

    def device_uri(self, user: str, secret: str) -> str:
        parts = urllib.parse.urlsplit(self.base)
        scheme = "ipps" if parts.scheme == "https" else "ipp"
        # Percent-encoded: an email has an "@", a token or password may have anything.
        userinfo = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(secret, safe='')}"
        return f"{scheme}://{userinfo}@{parts.netloc}{parts.path}{self.ipp_path}"


def relay_url(text: str | None) -> str:
    if not text:
        raise InstallFailed("the relay's URL is required: --relay https://... (or PRINTRELAY_RELAY_URL)")
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.username or parts.query:
        raise InstallFailed(
            f"--relay must be the relay's http(s) URL, like https://print.example.com, not {text!r}"
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def queue_name(printer_id: str, queue: str | None) -> str:
    name = queue or re.sub(r"[\s/\\#@'\"]", "_", printer_id)[:127]
    if not QUEUE_RE.match(name):
        raise InstallFailed(f"{name!r} cannot be a queue name: no spaces, '/', '\\', '#', '@' or quotes")
    return name


def _ask(prompt: str) -> str:
    if not sys.stdin.isatty():
        raise InstallFailed("--user EMAIL is required when not run on a terminal")
    return input(prompt).strip()


def _password(args: argparse.Namespace, email: str, host: str) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"Password for {email} at {host}: ")
    else:
        raise InstallFailed("no password: give --password-stdin, or run on a terminal to be asked for it")
    if not password:
        raise InstallFailed("the password is empty")
    return password


def _refusal(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"


def check_printer(client: httpx.Client, relay: Relay, email: str) -> dict[str, str]:
    """The printer's description, asked for as CUPS will ask (IPP, Basic credentials)."""
    request = new_request(Operation.GET_PRINTER_ATTRIBUTES, 1, printer_uri=f"{relay.base}{relay.ipp_path}")
    request.operation.add("requesting-user-name", ValueTag.NAME, email)
    request.operation.add(
        "requested-attributes", ValueTag.KEYWORD, "printer-make-and-model", "printer-info", "printer-location"
    )
    reply = client.post(relay.ipp_path, content=encode(request), headers={"content-type": "application/ipp"})
    if reply.status_code == 401:
        reason = _refusal(reply)
        if reason == "wrong email or password":
            raise InstallFailed(f"wrong email or password for {email} at {relay.base}")
        raise InstallFailed(f"{relay.base} refused {email}: {reason}")
    if reply.status_code == 429:
        raise InstallFailed(f"{relay.base}: {_refusal(reply)}")
    if reply.status_code != 200 or reply.headers.get("content-type", "").split(";")[0] != "application/ipp":
        raise InstallFailed(
            f"{relay.base} does not answer IPP at {relay.ipp_path} (HTTP {reply.status_code}): "
            "is it a printrelay relay?"
        )
    try:
        answer, _ = decode(reply.content)
    except IPPError as exc:
        raise InstallFailed(f"{relay.base} answered with a malformed IPP message: {exc.message}") from None
    if answer.code == Status.CLIENT_ERROR_NOT_FOUND:
        raise InstallFailed(f"printer {relay.printer_id} not found at {relay.base}")
    if not Status.SUCCESSFUL_OK <= answer.code < 0x0100:
        message = answer.value(DelimiterTag.OPERATION_ATTRIBUTES, "status-message")
        reason = message if isinstance(message, str) and message else keyword(Status, answer.code)
        raise InstallFailed(f"{relay.base} refused printer {relay.printer_id}: {reason}")
    found = {}
    for name in ("printer-make-and-model", "printer-info", "printer-location"):
        value = answer.value(DelimiterTag.PRINTER_ATTRIBUTES, name)
        if isinstance(value, str) and value:
            found[name] = value
    return found


def make_token(client: httpx.Client, relay: Relay, queue: str) -> tuple[str, str]:
    """A token of the person's own for this queue: (its id, the secret)."""
    label = f"CUPS queue {queue} on {socket.gethostname()}"[:100]
    reply = client.post("/v1/me/tokens", json={"label": label})
    if reply.status_code != 201:
        raise InstallFailed(f"{relay.base} made no token for this queue: {_refusal(reply)}")
    made = reply.json()
    return str(made["id"]), str(made["token"])


def _cups(args: list[str], timeout: float = LPADMIN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        raise InstallFailed(
            f"{args[0]} not found: CUPS's client programs are needed "
            "(Debian, Ubuntu: apt install cups-client; Fedora: dnf install cups-client)"
        )
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def queue_exists(queue: str) -> bool:
    return _cups(["lpstat", "-p", queue]).returncode == 0


def queue_options(queue: str) -> str:
    return _cups(["lpoptions", "-p", queue, "-l"]).stdout.strip()


def add_queue(queue: str, device_uri: str, info: str, location: str) -> None:
    args = ["lpadmin", "-p", queue, "-E", "-v", device_uri, "-m", "everywhere", "-D", info]
    if location:
        args += ["-L", location]
    result = _cups(args)
    if result.returncode != 0:
        error = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        hint = ""
        if re.search(r"forbidden|unauthorized|not authorized", error, re.IGNORECASE):
            hint = " (run it as root, e.g. with sudo, or as a member of the lpadmin group)"
        raise InstallFailed(f"lpadmin could not add queue {queue}: {error}{hint}")


def wait_for_options(queue: str, timeout: float = PPD_TIMEOUT) -> bool:
    """Whether CUPS made the queue's options (its PPD) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if queue_options(queue):
            return True
        time.sleep(0.2)  # CUPS tells no one: its queue is polled, as lpoptions would be by hand
    return False


def run_add_printer(args: argparse.Namespace) -> int:
    relay = Relay(relay_url(args.relay), args.printer)
    queue = queue_name(args.printer, args.queue)
    if queue_exists(queue):
        raise InstallFailed(
            f"a queue named {queue} exists: choose another --queue, or remove it (lpadmin -x {queue})"
        )
    host = urllib.parse.urlsplit(relay.base).netloc
    email = (args.user or _ask("Email: ")).strip()
    if not email:
        raise InstallFailed("an email is required: --user EMAIL")
    password = _password(args, email, host)
    try:
        with httpx.Client(
            base_url=relay.base, auth=(email, password), timeout=httpx.Timeout(30, connect=10)
        ) as http:
            described = check_printer(http, relay, email)
            token_id, token = make_token(http, relay, queue)
            try:
                info = described.get("printer-info") or f"{args.printer} (printrelay)"
                add_queue(queue, relay.device_uri(email, token), info, described.get("printer-location", ""))
                if not wait_for_options(queue):
                    _cups(["lpadmin", "-x", queue])
                    raise InstallFailed(
                        f"CUPS could not read printer {args.printer}'s options from {relay.base} within "
                        f"{PPD_TIMEOUT:.0f} s (its error_log says why); queue {queue} was not added"
                    )
            except BaseException:
                with contextlib.suppress(httpx.HTTPError):  # the queue that would have kept it is not there
                    http.delete(f"/v1/me/tokens/{token_id}")
                raise
    except httpx.ConnectError as exc:
        raise InstallFailed(f"relay unreachable at {relay.base}: {exc}") from None
    except httpx.TimeoutException:
        raise InstallFailed(f"relay at {relay.base} did not answer in time") from None
    except httpx.HTTPError as exc:
        raise InstallFailed(f"talking to the relay at {relay.base} failed: {exc}") from None
    model = described.get("printer-make-and-model")
    what = f"printer {args.printer}" + (f" ({model})" if model else "")
    print(f"added queue {queue}: {what} at {relay.base} as {email}; print with: lp -d {queue} FILE")
    return 0
