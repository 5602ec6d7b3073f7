"""A device reached over ssh (a Raspberry Pi, any Linux board), through the system's OpenSSH client.

Key-based and non-interactive (BatchMode), host keys checked (StrictHostKeyChecking=yes unless the user
asks to accept a new one). Layout on the device, under --remote-dir (default ~/.cache/edgec):

    bundles/<manifest sha256[:16]>/   the bundle, pushed once; files whose sha256 matches are skipped
    runs/<run id>/runtimes/           the bench agent of one run (removed after it unless --keep)

Before the bundle is pushed, the probe runs from the ssh command's stdin, so a refused preflight leaves
nothing on the device. The run's agent watches its stdin: when the connection drops it kills its process
group and removes the run directory, so no stray process stays behind.
"""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import runtimes
from compiler.errors import EdgecError, UsageError
from devices.base import Device
from runtimes.registry import device_files

RUNTIMES_DIR = Path(runtimes.__file__).resolve().parent
SSH_FAILED = 255  # ssh's exit status for its own errors; anything else is the remote command's
# After --timeout the device's agent stops the run itself; the host waits this much longer for its answer.
ANSWER_GRACE_S = 30
SHORT_CALL_S = 120  # probe, verify, cleanup: no bundle-sized work

# The extraction runs before the agent is there, so it is a one-liner for the device's Python (3.8+).
EXTRACT = ("import sys,tarfile;t=tarfile.open(fileobj=sys.stdin.buffer,mode='r|');"
           "f=getattr(tarfile,'data_filter',None);t.extractall('.',**({'filter':f} if f else {}))")


def _read_outputs(proc: subprocess.Popen) -> tuple[dict, list]:
    """Drain stdout and stderr in threads, so a chatty command never blocks on a full pipe."""
    outputs: dict = {}
    readers = [threading.Thread(target=lambda k=k, s=s: outputs.__setitem__(k, s.read()), daemon=True)
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    return outputs, readers


def parse_ssh_url(url: str) -> tuple[str | None, str, int | None]:
    """ssh://[user@]host[:port] -> (user, host, port)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--device {url}: the port is not a number in 1-65535") from None
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--device {url}: expected ssh://user@host[:port], e.g. ssh://pi@raspberrypi.local")
    if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
        raise UsageError(f"--device {url}: a host or user may not start with '-'")
    return parts.username, parts.hostname, port


def ssh_error(url: str, stderr: str, during: str) -> EdgecError:
    """One line for what went wrong in ssh itself (exit 255), with what to do about it."""
    # The agent's own progress lines are not ssh's words.
    text = " ".join(" ".join(line for line in stderr.splitlines() if not line.startswith("edgec-agent:")).split())
    lower = text.lower()
    if "connection refused" in lower:
        return EdgecError(f"{url}: connection refused; is sshd running there and listening on that port?")
    if "permission denied" in lower:
        return EdgecError(f"{url}: authentication failed ({text[text.lower().find('permission denied'):][:80]}); "
                          "pass the right key with --identity, or add its public key to ~/.ssh/authorized_keys "
                          "on the device")
    if "remote host identification has changed" in lower:
        return EdgecError(f"{url}: the device's host key has CHANGED since it was recorded in known_hosts; if the "
                          "device was reinstalled, remove the old key with ssh-keygen -R HOST, else do not connect")
    if "host key verification failed" in lower or "host key is known" in lower:
        return EdgecError(f"{url}: the device's host key is not in known_hosts; check its fingerprint and add it "
                          "(ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts), pass --known-hosts FILE, or "
                          "--accept-new-host-key to trust it on first contact")
    if "could not resolve hostname" in lower or "name or service not known" in lower:
        return EdgecError(f"{url}: unknown host name; check the address")
    if ("connect to host" in lower and "timed out" in lower) or "no route to host" in lower:
        return EdgecError(f"{url}: no answer ({text[:80]}); is the device on and reachable?")
    if any(s in lower for s in ("connection closed", "closed by remote host", "connection reset", "broken pipe", "not responding",
                                "timed out", "lost connection")) or not text:
        return EdgecError(f"{url}: the connection dropped during the {during} ({text[:100] or 'no message'}); "
                          "the agent on the device stops and cleans up when its connection closes")
    return EdgecError(f"{url}: ssh failed during the {during}: {text[:160]}")


class SshDevice(Device):
    kind = "ssh"

    def __init__(self, url: str, identity: Path | None = None, known_hosts: Path | None = None,
                 accept_new_host_key: bool = False, remote_python: str = "python3",
                 remote_dir: str = "~/.cache/edgec", memory_cap_mb: float = 0, connect_timeout_s: int = 10):
        self.user, self.host, self.port = parse_ssh_url(url)
        self.name = url
        for option, path in (("--identity", identity), ("--known-hosts", known_hosts)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{option} {path}: no such file")
        self.identity, self.known_hosts = identity, known_hosts
        self.accept_new_host_key = accept_new_host_key
        self.remote_python = remote_python
        # ssh starts commands in the home directory: a ~/ path becomes relative to it (quoting stops ~).
        root = remote_dir[2:] if remote_dir.startswith("~/") else ("." if remote_dir == "~" else remote_dir)
        self.root = root.rstrip("/") or "/"
        self.memory_cap_mb = memory_cap_mb
        self.connect_timeout_s = connect_timeout_s
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.run_dir = f"{self.root}/runs/{self.run_id}"

    # -- ssh plumbing ------------------------------------------------------------------------------------

    def ssh_command(self, remote_command: str) -> list[str]:
        command = ["ssh", "-o", "BatchMode=yes",
                   "-o", f"StrictHostKeyChecking={'accept-new' if self.accept_new_host_key else 'yes'}",
                   "-o", f"ConnectTimeout={self.connect_timeout_s}",
                   # A dead link is noticed in about 15 s instead of TCP's minutes.
                   "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                   "-o", "LogLevel=ERROR"]
        if self.port:
            command += ["-p", str(self.port)]
        if self.user:
            command += ["-l", self.user]
        if self.identity:
            command += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            command += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        return command + ["--", self.host, remote_command]

    def _python(self, *args: str) -> str:
        return " ".join(shlex.quote(a) for a in (self.remote_python, *args))

    def _call(self, remote_command: str, during: str, stdin: bytes = b"", timeout_s: float = SHORT_CALL_S) -> str:
        try:
            proc = subprocess.run(self.ssh_command(remote_command), input=stdin, capture_output=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise EdgecError(f"{self.name}: no answer within {timeout_s:.0f} s during the {during}") from None
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode == SSH_FAILED:
            raise ssh_error(self.name, stderr, during)
        if proc.returncode != 0:
            last = (stderr.strip().splitlines() or ["no message"])[-1]
            if "not found" in last and self.remote_python in last:
                raise EdgecError(f"{self.name}: {self.remote_python} is not on the device's PATH; install Python 3 "
                                 "there or pass --remote-python /path/to/python3")
            raise EdgecError(f"{self.name}: the {during} failed on the device (exit {proc.returncode}): {last[:160]}")
        return proc.stdout.decode("utf-8", "replace")

    def _stdin_program(self, *argv: str) -> bytes:
        """The agent as one script for `python3 -`: base and agent loaded as the `runtimes` package."""
        sources = {name: (RUNTIMES_DIR / f"{name}.py").read_text() for name in ("base", "agent")}
        return (
            "import sys, types\n"
            "package = types.ModuleType('runtimes'); package.__path__ = []; sys.modules['runtimes'] = package\n"
            f"for name, source in {sources!r}.items():\n"
            "    module = types.ModuleType('runtimes.' + name); module.__file__ = name + '.py'\n"
            "    sys.modules[module.__name__] = module; setattr(package, name, module)\n"
            "    exec(compile(source, module.__file__, 'exec'), module.__dict__)\n"
            f"sys.exit(sys.modules['runtimes.agent'].main({list(argv)!r}))\n"
        ).encode()

    def _agent_via_stdin(self, during: str, *argv: str) -> dict:
        out = self._call(self._python("-"), during, stdin=self._stdin_program(*argv))
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise EdgecError(f"{self.name}: the {during} gave no readable answer: {out[:120]!r}") from None

    # -- the Device protocol -----------------------------------------------------------------------------

    def bundle_dir(self, bundle_key: str) -> str:
        return f"{self.root}/bundles/{bundle_key}"

    def probe(self, bundle_key, expected):
        answer = self._agent_via_stdin("preflight", "probe", "--bundle-dir", self.bundle_dir(bundle_key),
                                       "--expect", json.dumps(expected))
        return answer["facts"], answer["cached"]

    def stage(self, bundle_dir, bundle_key, expected, cached, runtime, log):
        """One tar stream: the missing bundle files and this run's agent; then the device checks the pushed
        files' sha256 and records them so the next run skips them."""
        missing = [name for name in expected if name not in cached]
        run_rel = f"runs/{self.run_id}"
        buffer_names = {f"{run_rel}/runtimes/{name}": RUNTIMES_DIR / name for name in device_files(runtime)}
        expect = json.dumps({name: expected[name] for name in missing}).encode()
        pushed_bytes = sum(expected[name][0] for name in missing)
        log(f"pushing {len(missing)} bundle files ({pushed_bytes / 1e6:.1f} MB) to {self.name}, "
            f"{len(cached)} already there")
        remote = (f"mkdir -p {shlex.quote(self.root)} && cd {shlex.quote(self.root)} && "
                  f"{self._python('-c', EXTRACT)} && cd {shlex.quote(run_rel)} && "
                  + self._python("-m", "runtimes.agent", "verify", "--bundle-dir", f"../../bundles/{bundle_key}",
                                 "--expect", "expect.json"))
        proc = subprocess.Popen(self.ssh_command(remote), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        outputs, readers = _read_outputs(proc)
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                for name in missing:
                    tar.add(bundle_dir / name, arcname=f"bundles/{bundle_key}/{name}", recursive=False)
                for arcname, path in buffer_names.items():
                    tar.add(path, arcname=arcname, recursive=False)
                info = tarfile.TarInfo(f"{run_rel}/expect.json")
                info.size, info.mtime = len(expect), int(time.time())
                tar.addfile(info, io.BytesIO(expect))
        except BrokenPipeError:
            pass  # ssh ended early; its exit status and stderr say why
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        proc.wait()
        for reader in readers:
            reader.join()
        stderr = outputs.get("err", b"").decode("utf-8", "replace")
        if proc.returncode == SSH_FAILED:
            raise ssh_error(self.name, stderr, "push")
        if proc.returncode != 0:
            last = (stderr.strip().splitlines() or ["no message"])[-1]
            raise EdgecError(f"{self.name}: pushing the bundle failed on the device (exit {proc.returncode}): {last[:160]}")
        mismatched = json.loads(outputs["out"].decode().strip().splitlines()[-1])["mismatched"]
        if mismatched:
            raise EdgecError(f"{bundle_dir}: {', '.join(mismatched)} arrived with a sha256 other than manifest.json "
                             "records; the bundle changed since its build: rebuild it")
        return f"../../bundles/{bundle_key}"  # relative to the run directory, where the agent starts

    def run(self, runtime, bundle_path, agent_args, timeout_s, keep):
        # cd into the run directory so `-m runtimes.<runtime>` imports the pushed package, not another.
        command = ["-m", "runtimes.agent", "run", "--run-dir", ".", "--runtime", runtime, "--watch-stdin",
                   "--timeout", str(timeout_s), "--memory-cap-mb", str(self.memory_cap_mb)]
        command += ["--keep"] if keep else []
        command += [] if self.huge_pages else ["--no-huge-pages"]
        remote = f"cd {shlex.quote(self.run_dir)} && exec " + self._python(*command, "--", bundle_path, *agent_args)
        # stdin stays open and unused: the agent takes its end-of-file as the connection's end.
        proc = subprocess.Popen(self.ssh_command(remote), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        outputs, readers = _read_outputs(proc)
        limit = timeout_s + ANSWER_GRACE_S if timeout_s else None
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"status": "timeout", "seconds": limit, "stderr": "no answer from the device after --timeout"}
        finally:
            proc.stdin.close()
        for reader in readers:
            reader.join(10)
        stderr = outputs.get("err", b"").decode("utf-8", "replace")
        if proc.returncode == SSH_FAILED:
            raise ssh_error(self.name, stderr, "run")
        try:
            return json.loads(outputs.get("out", b"").decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            last = (stderr.strip().splitlines() or ["no message"])[-1]
            raise EdgecError(f"{self.name}: the run ended without an answer (exit {proc.returncode}): {last[:160]}") from None

    def cleanup(self, keep):
        self._agent_via_stdin("cleanup", "cleanup", "--run-dir", self.run_dir, *(["--keep"] if keep else []))

    def describe(self, facts):
        return {**facts, "name": self.name, "kind": "ssh"}
